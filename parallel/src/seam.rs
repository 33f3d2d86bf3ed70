//! Failures inside the model's seams. The `TokenDispatcher`, attention and autodiff
//! `backward` interfaces have no error channel, so a failed collective there (a timeout, a
//! rank that left, a mismatch) unwinds with a [`SeamFailure`] payload; the step that ran the
//! model turns it back into an error with [`catch_seam_failure`], and
//! [`quiet_seam_failures`] keeps the panic hook from printing it as a crash (with a
//! backtrace) before that: one clean error per failure.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use crate::error::ParallelError;

/// The payload of a seam's unwinding: what failed.
#[derive(Debug)]
pub struct SeamFailure(pub ParallelError);

/// Ends the model code at a seam with `error` (caught by [`catch_seam_failure`]); typed as
/// any `T` so it fits `unwrap_or_else`.
pub fn fail<T>(error: ParallelError) -> T {
    std::panic::panic_any(SeamFailure(error))
}

/// Ends the model code at a seam because `op` failed with `error`.
pub fn fail_comm<T>(op: &str, error: switchyard_comm::CommError) -> T {
    fail(ParallelError::comm(op)(error))
}

/// Runs `f` (a forward and backward of a parallelized model); a [`SeamFailure`] inside it
/// becomes `Err`. Any other panic goes on unwinding.
pub fn catch_seam_failure<T, E: From<ParallelError>>(
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<SeamFailure>() {
            Ok(failure) => Err(E::from(failure.0)),
            Err(other) => resume_unwind(other),
        },
    }
}

/// Installs a panic hook that stays silent for [`SeamFailure`] payloads (their error is
/// reported by whoever catches them) and hands every other panic to the previous hook.
pub fn quiet_seam_failures() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<SeamFailure>().is_none() {
            previous(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seam_failure_comes_back_as_the_error_and_other_panics_go_on() {
        let caught: Result<(), ParallelError> = catch_seam_failure(|| {
            fail::<Result<(), ParallelError>>(ParallelError::Agreement(
                "the exchange timed out".into(),
            ))
        });
        assert_eq!(caught.unwrap_err().to_string(), "the exchange timed out");
        let other = std::panic::catch_unwind(|| {
            catch_seam_failure::<(), ParallelError>(|| panic!("a bug"))
        });
        assert_eq!(*other.unwrap_err().downcast::<&str>().unwrap(), "a bug");
    }
}
