//! Synthetic English-like corpus for the quickstart: no download, deterministic from a seed.
//!
//! Sentences come from a small grammar with a fixed vocabulary, subject-verb number agreement
//! ("the cat sees" / "the cats see"), article agreement ("a owl" never occurs) and stock
//! phrases, so even a tiny byte-level model finds structure to learn within ~100 steps.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (singular, plural) nouns.
pub(crate) const NOUNS: &[(&str, &str)] = &[
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("fox", "foxes"),
    ("child", "children"),
    ("farmer", "farmers"),
    ("teacher", "teachers"),
    ("owl", "owls"),
    ("horse", "horses"),
    ("robot", "robots"),
];
/// (singular, plural) transitive verb forms.
pub(crate) const VERBS: &[(&str, &str)] = &[
    ("sees", "see"),
    ("likes", "like"),
    ("chases", "chase"),
    ("finds", "find"),
    ("watches", "watch"),
    ("helps", "help"),
];
/// (singular, plural) intransitive verb forms.
pub(crate) const INTRANSITIVE: &[(&str, &str)] = &[
    ("sleeps", "sleep"),
    ("runs", "run"),
    ("sings", "sing"),
    ("waits", "wait"),
];
const ADJECTIVES: &[&str] = &["small", "big", "red", "old", "quiet", "happy", "green"];
const PLACES: &[&str] = &[
    "in the garden",
    "near the river",
    "on the hill",
    "at night",
    "in the morning",
    "by the old barn",
];
const OBJECTS: &[&str] = &[
    "the ball",
    "a stone",
    "the moon",
    "an apple",
    "the red door",
    "a book",
];

/// Deterministic uniform index below `n` (Lemire's multiply; stable across `rand` versions).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[below(rng, items.len())]
}

fn noun_phrase(rng: &mut ChaCha8Rng, out: &mut String) -> bool {
    let plural = below(rng, 2) == 1;
    let &(sg, pl) = pick(rng, NOUNS);
    let adj = (below(rng, 3) == 0).then(|| *pick(rng, ADJECTIVES));
    let first = adj.unwrap_or(if plural { pl } else { sg });
    let det = if plural {
        *pick(rng, &["the", "two", "some", "many"])
    } else if below(rng, 2) == 0 {
        "the"
    } else if first.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    out.push_str(det);
    out.push(' ');
    if let Some(a) = adj {
        out.push_str(a);
        out.push(' ');
    }
    out.push_str(if plural { pl } else { sg });
    plural
}

fn sentence(rng: &mut ChaCha8Rng, out: &mut String) {
    let start = out.len();
    if below(rng, 8) == 0 {
        out.push_str("once upon a time, ");
    }
    let plural = noun_phrase(rng, out);
    out.push(' ');
    let form = |&(sg, pl): &(&'static str, &'static str)| if plural { pl } else { sg };
    match below(rng, 3) {
        0 => out.push_str(form(pick(rng, INTRANSITIVE))),
        1 => {
            out.push_str(form(pick(rng, VERBS)));
            out.push(' ');
            noun_phrase(rng, out);
        }
        _ => {
            out.push_str(form(pick(rng, VERBS)));
            out.push(' ');
            out.push_str(pick::<&str>(rng, OBJECTS));
        }
    }
    if below(rng, 2) == 0 {
        out.push(' ');
        out.push_str(pick::<&str>(rng, PLACES));
    }
    if below(rng, 6) == 0 {
        out.push_str(", and then ");
        out.push_str(if plural { "they" } else { "it" });
        out.push(' ');
        out.push_str(form(pick(rng, INTRANSITIVE)));
    }
    out.push('.');
    // Capitalize the first letter of the sentence (all text is ASCII).
    if let Some(c) = out[start..].chars().next() {
        out.replace_range(start..start + 1, &c.to_ascii_uppercase().to_string());
    }
}

/// Exactly `bytes` bytes of ASCII text, a pure function of (`seed`, `bytes`).
///
/// Paragraphs of 3-7 sentences end with a newline, every few paragraphs with "the end.".
pub fn synthetic_text(seed: u64, bytes: usize) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        let n = 3 + below(&mut rng, 5);
        for i in 0..n {
            if i > 0 {
                out.push(' ');
            }
            sentence(&mut rng, &mut out);
        }
        if below(&mut rng, 4) == 0 {
            out.push_str(" The end.");
        }
        out.push('\n');
    }
    out.truncate(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a = synthetic_text(7, 50_000);
        assert_eq!(a.len(), 50_000);
        assert_eq!(a, synthetic_text(7, 50_000));
        assert_ne!(a, synthetic_text(8, 50_000));
        // A shorter request is a prefix: the text does not depend on `bytes` otherwise.
        assert!(a.starts_with(&synthetic_text(7, 1234)));
        assert!(a.is_ascii());
    }

    #[test]
    fn verbs_agree_with_subjects() {
        let text = synthetic_text(3, 200_000);
        let words: Vec<&str> = text
            .split([' ', '.', ',', '\n'])
            .filter(|w| !w.is_empty())
            .collect();
        let mut checked = 0;
        for pair in words.windows(2) {
            let noun = pair[0].to_ascii_lowercase();
            let Some(&(sg, pl)) = NOUNS.iter().find(|(s, p)| *s == noun || *p == noun) else {
                continue;
            };
            let verb = pair[1];
            for &(vs, vp) in VERBS.iter().chain(INTRANSITIVE) {
                if verb == vs || verb == vp {
                    let noun_plural = noun == pl;
                    assert!(noun == sg || noun_plural);
                    assert_eq!(verb == vp, noun_plural, "disagreement: {noun} {verb}");
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 1000,
            "too few subject-verb pairs checked: {checked}"
        );
        assert!(!text.contains(" a owl") && !text.contains(" a old") && !text.contains("A old"));
    }

    #[test]
    fn bigram_model_beats_uniform_clearly() {
        // Learnable structure: byte bigram statistics from the first 90% predict the last 10%
        // far better than the 8 bits/byte of a uniform byte model.
        let text = synthetic_text(0, 300_000).into_bytes();
        let cut = text.len() * 9 / 10;
        let mut counts = vec![[1.0f64; 256]; 256]; // add-one smoothing
        for w in text[..cut].windows(2) {
            counts[w[0] as usize][w[1] as usize] += 1.0;
        }
        let mut nll = 0.0;
        let held = &text[cut..];
        for w in held.windows(2) {
            let row = &counts[w[0] as usize];
            nll -= (row[w[1] as usize] / row.iter().sum::<f64>()).log2();
        }
        let bits_per_byte = nll / (held.len() - 1) as f64;
        assert!(
            bits_per_byte < 3.5,
            "bigram cross-entropy {bits_per_byte} bits/byte"
        );
    }
}
