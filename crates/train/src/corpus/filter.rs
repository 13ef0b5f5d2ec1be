//! Which teacher answers a corpus keeps: not too short, not looping on itself (a small model
//! sampling long text sometimes repeats a phrase until the limit), and not mostly a copy of an
//! earlier answer (near-duplicates by shared token 8-grams, MinHash-free: every kept answer's
//! 8-grams are remembered, a few bytes each).

use std::collections::HashSet;

/// Answers shorter than this are dropped.
pub const MIN_ANSWER_TOKENS: usize = 16;
/// Shingle length of the near-duplicate test.
const SHINGLE: usize = 8;
/// An answer whose 8-grams were seen before at this share or more is a near-duplicate.
const DUPLICATE_SHARE: f64 = 0.5;
/// An answer whose distinct 4-grams are under this share of its 4-grams loops on itself.
const MIN_DISTINCT_4GRAMS: f64 = 0.5;

/// What [`Filter::judge`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    TooShort,
    Repetitive,
    NearDuplicate,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Keep => "kept",
            Verdict::TooShort => "too short",
            Verdict::Repetitive => "repetitive",
            Verdict::NearDuplicate => "near-duplicate",
        }
    }
}

/// The 8-grams of every kept answer.
#[derive(Debug, Default)]
pub struct Filter {
    seen: HashSet<u64>,
}

fn hash(gram: &[u32]) -> u64 {
    crate::data::fnv(gram.iter().flat_map(|t| t.to_le_bytes()))
}

impl Filter {
    /// Judges `answer` against the answers kept so far, remembering it when kept.
    pub fn judge(&mut self, answer: &[u32]) -> Verdict {
        if answer.len() < MIN_ANSWER_TOKENS {
            return Verdict::TooShort;
        }
        if distinct_ngram_share(&[answer], 4) < MIN_DISTINCT_4GRAMS {
            return Verdict::Repetitive;
        }
        let grams: Vec<u64> = answer.windows(SHINGLE).map(hash).collect();
        let seen = grams.iter().filter(|g| self.seen.contains(g)).count();
        if seen as f64 >= DUPLICATE_SHARE * grams.len() as f64 {
            return Verdict::NearDuplicate;
        }
        self.seen.extend(grams);
        Verdict::Keep
    }
}

/// Distinct `n`-grams over all `n`-grams of `texts` (each text's own n-grams; none crosses
/// from one text into the next).
pub fn distinct_ngram_share<T: AsRef<[u32]>>(texts: &[T], n: usize) -> f64 {
    let mut distinct = HashSet::new();
    let mut total = 0usize;
    for t in texts {
        for g in t.as_ref().windows(n) {
            distinct.insert(hash(g));
            total += 1;
        }
    }
    if total == 0 {
        return 0.0;
    }
    distinct.len() as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_looping_and_copied_answers_are_dropped() {
        let mut f = Filter::default();
        let a: Vec<u32> = (0..40).collect();
        assert_eq!(f.judge(&a[..10]), Verdict::TooShort);
        assert_eq!(f.judge(&a), Verdict::Keep);
        // The same answer again, or with a few tokens changed at the end.
        assert_eq!(f.judge(&a), Verdict::NearDuplicate);
        let mut b = a.clone();
        b[35..].copy_from_slice(&[900, 901, 902, 903, 904]);
        assert_eq!(f.judge(&b), Verdict::NearDuplicate);
        // A phrase repeated until the limit.
        let looping: Vec<u32> = (0..60).map(|i| 500 + i % 3).collect();
        assert_eq!(f.judge(&looping), Verdict::Repetitive);
        // A different answer is kept.
        let c: Vec<u32> = (1000..1040).collect();
        assert_eq!(f.judge(&c), Verdict::Keep);
    }

    #[test]
    fn distinct_share_counts_within_texts() {
        assert_eq!(distinct_ngram_share(&[vec![1, 2, 3, 4]], 2), 1.0);
        assert_eq!(distinct_ngram_share(&[vec![1, 1, 1, 1, 1]], 1), 0.2);
        // [1,2] in both texts: 2 distinct of 3.
        assert!((distinct_ngram_share(&[vec![1, 2], vec![1, 2, 3]], 2) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(distinct_ngram_share(&[vec![1]], 2), 0.0);
    }
}
