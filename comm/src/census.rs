//! Who was missing: asked after an operation timed out on a backend that cannot say itself.
//!
//! NCCL reports nothing about its peers when a collective hangs: a rank only sees that its
//! own kernel never finished. After the watchdog aborts the communicator, the ranks that are
//! still alive meet on the communicator's MPI twin and tell each other how many operations
//! they had issued. A rank that did not issue the timed-out operation, or that does not come
//! to the census within the twin's timeout, is reported missing.

use crate::{Buffer, CommError, Communicator};

/// The outcome of a census: the ranks that had not reached the operation, and how that was
/// established (for the error message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub missing: Vec<usize>,
    pub how: String,
}

/// After operation number `seq` (0-based, in issue order) timed out on this rank, which
/// issued `issued` operations in all (`issued > seq`): every rank of `twin` that answers says
/// how many it issued; those that issued `seq` or fewer never reached the operation. Ranks
/// that do not answer within `twin`'s timeout are missing too. Collective over `twin`.
pub fn census(twin: &dyn Communicator, issued: u64, seq: u64) -> Census {
    let n = twin.size();
    let mine = Buffer::I64(vec![i64::try_from(issued).unwrap_or(i64::MAX)]);
    match twin.all_gather_v(&mine, &vec![1; n]) {
        Ok(counts) => {
            let counts = counts.as_slice::<i64>().unwrap_or(&[]).to_vec();
            let missing = counts
                .iter()
                .enumerate()
                .filter(|&(_, &c)| u64::try_from(c).unwrap_or(0) <= seq)
                .map(|(j, _)| j)
                .collect();
            Census {
                missing,
                how: format!(
                    "operations issued per rank (census over `{}`): {counts:?}",
                    twin.name()
                ),
            }
        }
        Err(CommError::Timeout { missing, .. }) => Census {
            how: format!(
                "ranks {missing:?} did not answer the census over `{}` either: they are not \
                 waiting in this communicator (hung in compute, in another communicator, or gone)",
                twin.name()
            ),
            missing,
        },
        Err(CommError::PeerExited { exited, .. }) => Census {
            how: format!("ranks {exited:?} have exited"),
            missing: exited,
        },
        Err(e) => Census {
            missing: Vec::new(),
            how: format!("the census over `{}` failed: {e}", twin.name()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::LocalWorld;

    #[test]
    fn ranks_that_issued_fewer_operations_are_the_missing_ones() {
        // Operation 4 timed out: ranks 0 and 2 issued it (5 operations), rank 1 only 4.
        let got = LocalWorld::run(3, Duration::from_secs(20), None, |c| {
            let issued = if c.rank() == 1 { 4 } else { 5 };
            census(c, issued, 4)
        });
        for c in &got {
            assert_eq!(c.missing, vec![1], "{}", c.how);
            assert!(c.how.contains("[5, 4, 5]"), "{}", c.how);
        }
    }

    #[test]
    fn a_rank_that_never_comes_to_the_census_is_missing() {
        let got = LocalWorld::run(3, Duration::from_millis(300), None, |c| {
            if c.rank() == 2 {
                // Hung elsewhere for longer than the census waits.
                std::thread::sleep(Duration::from_millis(1500));
                return None;
            }
            Some(census(c, 7, 6))
        });
        for c in got.iter().take(2) {
            let c = c.as_ref().unwrap();
            assert_eq!(c.missing, vec![2], "{}", c.how);
            assert!(c.how.contains("did not answer"), "{}", c.how);
        }
    }

    #[test]
    fn when_every_rank_issued_the_operation_nobody_is_missing() {
        let got = LocalWorld::run(2, Duration::from_secs(20), None, |c| census(c, 3, 2));
        assert!(got.iter().all(|c| c.missing.is_empty()));
    }
}
