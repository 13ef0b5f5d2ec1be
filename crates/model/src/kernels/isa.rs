//! The instruction sets the kernels are written for, detected at run time so one binary runs
//! on every x86-64 CPU. A kernel's entry point takes a [`Supported`], which only detection
//! makes: safe code cannot run instructions the CPU lacks.

use std::sync::OnceLock;

/// An instruction set a kernel has a path for, slowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust for the baseline target: any CPU.
    Portable,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512F with AVX-512BW (every AVX-512 CPU since Skylake-SP).
    Avx512,
    /// AVX-512 with VNNI (`vpdpwssd`: int16 pair dot products into int32).
    Avx512Vnni,
    /// AVX-512 with BF16 (`vdpbf16ps`: bf16 pair dot products into f32).
    Avx512Bf16,
}

impl Isa {
    pub const ALL: [Isa; 5] = [
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Avx512Bf16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512f+bw",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Whether this CPU runs it (asks the CPU; [`Supported`] caches the answer).
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Portable => true,
                Isa::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Isa::Avx512 => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                }
                Isa::Avx512Vnni => {
                    Isa::Avx512.runs_here() && std::arch::is_x86_feature_detected!("avx512vnni")
                }
                Isa::Avx512Bf16 => {
                    Isa::Avx512.runs_here() && std::arch::is_x86_feature_detected!("avx512bf16")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }
}

/// An instruction set checked to run on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supported(Isa);

impl Supported {
    /// Every instruction set this CPU runs, slowest first (detected once).
    pub fn all() -> &'static [Supported] {
        static DETECTED: OnceLock<Vec<Supported>> = OnceLock::new();
        DETECTED.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .filter(|isa| isa.runs_here())
                .map(Supported)
                .collect()
        })
    }

    /// The fastest instruction set this CPU runs.
    pub fn best() -> Supported {
        // `Portable` always runs, so the list is never empty.
        Self::all()
            .last()
            .copied()
            .unwrap_or(Supported(Isa::Portable))
    }

    /// The fastest of `paths` (a kernel's instruction sets) this CPU runs; `Portable` when
    /// none does.
    pub fn best_of(paths: &[Isa]) -> Supported {
        Self::all()
            .iter()
            .rev()
            .find(|s| paths.contains(&s.0))
            .copied()
            .unwrap_or(Supported(Isa::Portable))
    }

    /// Why `isa` cannot run here, naming the missing instruction set (`None` when it runs).
    pub fn missing(isa: Isa) -> Option<&'static str> {
        (!Self::all().iter().any(|s| s.0 == isa)).then(|| isa.name())
    }

    pub fn isa(self) -> Isa {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_lists_portable_first_and_best_last() {
        let all = Supported::all();
        assert_eq!(all[0].isa(), Isa::Portable);
        assert_eq!(Supported::best(), *all.last().unwrap());
        assert!(all.windows(2).all(|w| w[0].isa() < w[1].isa()));
        eprintln!(
            "instruction sets here: {:?}",
            all.iter().map(|s| s.isa().name()).collect::<Vec<_>>()
        );
    }
}
