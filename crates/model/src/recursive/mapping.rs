//! Which original layers initialise the K shared layers of a recursive model (the paper's
//! Stepwise, Average, Lower and Random methods), and which shared layer each unrolled layer uses
//! (CYCLE sharing: unrolled layer `l` runs shared layer `l mod K`).

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How the shared layers are initialised from the N original layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Copy original layer `round(linspace(0, N-1, K))[k]` (first and last kept).
    Stepwise,
    /// Mean of original layers `k, k+K, k+2K, ...`.
    Average,
    /// Copy original layer `k` (the first K layers).
    Lower,
    /// Copy a seeded random sorted subset of K original layers.
    Random,
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Init::Stepwise => "stepwise",
            Init::Average => "average",
            Init::Lower => "lower",
            Init::Random => "random",
        })
    }
}

impl FromStr for Init {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stepwise" => Ok(Init::Stepwise),
            "average" => Ok(Init::Average),
            "lower" => Ok(Init::Lower),
            "random" => Ok(Init::Random),
            other => Err(ModelError::InvalidInput(format!(
                "unknown init `{other}` (expected stepwise, average, lower or random)"
            ))),
        }
    }
}

/// Checks that `k` shared layers can be looped over `n` original layers.
pub fn check_shape(n: usize, k: usize) -> Result<usize> {
    if n == 0 {
        return Err(ModelError::InvalidInput(
            "the source model has no layers".into(),
        ));
    }
    if k == 0 || k > n || !n.is_multiple_of(k) {
        return Err(ModelError::InvalidInput(format!(
            "block of {k} layers does not divide the source's {n} layers (choose a divisor of {n})"
        )));
    }
    Ok(n / k)
}

/// Round half to even, as Python's `round` and numpy do.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    r as usize
}

/// For each shared layer `k`, the original layers whose weights initialise it (averaged when
/// there are several).
pub fn source_layers(init: Init, n: usize, k: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    let loops = check_shape(n, k)?;
    Ok(match init {
        Init::Stepwise => (0..k)
            .map(|i| {
                // numpy's linspace: index times step, in that order of float operations.
                let step = if k == 1 {
                    0.0
                } else {
                    (n - 1) as f64 / (k - 1) as f64
                };
                let x = i as f64 * step;
                vec![round_half_even(x)]
            })
            .collect(),
        Init::Average => (0..k)
            .map(|i| (0..loops).map(|b| i + b * k).collect())
            .collect(),
        Init::Lower => (0..k).map(|i| vec![i]).collect(),
        Init::Random => {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut chosen = sample(&mut rng, n, k).into_vec();
            chosen.sort_unstable();
            chosen.into_iter().map(|i| vec![i]).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(init: Init, n: usize, k: usize) -> Vec<usize> {
        source_layers(init, n, k, 0)
            .unwrap()
            .into_iter()
            .map(|v| v[0])
            .collect()
    }

    #[test]
    fn stepwise_matches_the_paper_and_keeps_first_and_last() {
        assert_eq!(
            single(Init::Stepwise, 18, 9),
            vec![0, 2, 4, 6, 8, 11, 13, 15, 17]
        );
        // numpy: np.round(np.linspace(0, 29, 15)) and np.linspace(0, 29, 10)
        assert_eq!(
            single(Init::Stepwise, 30, 15),
            vec![0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
        );
        assert_eq!(
            single(Init::Stepwise, 30, 10),
            vec![0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
        );
    }

    #[test]
    fn average_groups_every_kth_layer() {
        let groups = source_layers(Init::Average, 30, 15, 0).unwrap();
        assert_eq!(groups[0], vec![0, 15]);
        assert_eq!(groups[14], vec![14, 29]);
        assert_eq!(
            source_layers(Init::Average, 30, 10, 0).unwrap()[3],
            vec![3, 13, 23]
        );
    }

    #[test]
    fn lower_takes_the_first_k() {
        assert_eq!(single(Init::Lower, 30, 10), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn random_is_seeded_sorted_and_distinct() {
        let a = single(Init::Random, 30, 15);
        assert_eq!(a, single(Init::Random, 30, 15));
        assert!(a.windows(2).all(|w| w[0] < w[1]), "{a:?}");
        assert!(*a.last().unwrap() < 30);
        let other = source_layers(Init::Random, 30, 15, 99).unwrap();
        assert_ne!(other.into_iter().map(|v| v[0]).collect::<Vec<_>>(), a);
    }

    #[test]
    fn bad_shapes_and_names_are_clear_errors() {
        assert!(check_shape(30, 7)
            .unwrap_err()
            .to_string()
            .contains("does not divide"));
        assert!(check_shape(30, 0).is_err());
        assert!(check_shape(0, 1)
            .unwrap_err()
            .to_string()
            .contains("no layers"));
        assert!("middle"
            .parse::<Init>()
            .unwrap_err()
            .to_string()
            .contains("unknown init `middle`"));
    }
}
