//! How a model's weights are held in memory: `f32`, `f16` (candle tensors), `bf16` or `q8` (int8
//! blocks), for every projection and the LM head. Embeddings follow in bf16 for the compact
//! formats (they are only gathered); norms, attention, per-loop LoRA deltas and exit heads stay
//! f32.

use std::fmt;
use std::str::FromStr;

use candle_core::DType;

use crate::kernels::isa::{Isa, Supported};

/// The weight format of a loaded model (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightDtype {
    /// 4 bytes a weight, rrt's packed f32 kernels.
    #[default]
    F32,
    /// 2 bytes a weight, candle's f16 matmul (no packed kernel: slower than f32 on CPUs).
    F16,
    /// 2 bytes a weight, packed bf16 panels, f32 activations and accumulation.
    Bf16,
    /// 1.125 bytes a weight: int8 in blocks of 32 with an f32 scale each; activations quantized
    /// per row the same way.
    Q8,
}

impl WeightDtype {
    pub const ALL: [WeightDtype; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Q8];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
        }
    }

    /// The candle dtype of the embedding table.
    pub(crate) fn embed_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 | Self::Q8 => DType::BF16,
        }
    }

    /// The candle dtype projection weights are read in before packing.
    pub(crate) fn read_dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            _ => DType::F32,
        }
    }

    /// The kernel this CPU runs for the format, and a line to log when it ranks below the
    /// instruction set the format is built for (the missing one named); `None` when it does
    /// not (f32 is built for AVX2 and also has an AVX-512 path).
    pub fn cpu_note(self) -> (&'static str, Option<String>) {
        let (paths, wanted): (&[Isa], Isa) = match self {
            Self::F32 => (&crate::kernels::F32_PATHS, Isa::Avx2),
            Self::F16 => return ("candle", None),
            Self::Bf16 => (&crate::kernels::bf16::PATHS, Isa::Avx512Bf16),
            Self::Q8 => (&crate::kernels::q8::PATHS, Isa::Avx512Vnni),
        };
        let used = Supported::best_of(paths).isa();
        let note = (used < wanted).then(|| {
            format!(
                "{} weights: this CPU lacks {}; using the {} kernel (slower)",
                self.name(),
                Supported::missing(wanted).unwrap_or(wanted.name()),
                used.name()
            )
        });
        (used.name(), note)
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown weight dtype `{s}` (one of f32, f16, bf16, q8)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in WeightDtype::ALL {
            assert_eq!(d.name().parse::<WeightDtype>(), Ok(d));
        }
        let e = "int4".parse::<WeightDtype>().unwrap_err();
        assert!(e.contains("int4") && e.contains("q8"), "{e}");
    }

    #[test]
    fn the_cpu_note_names_what_is_missing() {
        for d in WeightDtype::ALL {
            let (kernel, note) = d.cpu_note();
            assert!(!kernel.is_empty());
            if let Some(note) = note {
                assert!(note.contains("lacks"), "{note}");
            }
        }
    }

    #[test]
    fn a_cpu_above_the_wanted_instruction_set_gets_no_note() {
        // f32 is built for AVX2 and has an AVX-512 path: an AVX-512 CPU runs that one, quietly.
        let best = Supported::best_of(&crate::kernels::F32_PATHS).isa();
        let (kernel, note) = WeightDtype::F32.cpu_note();
        assert_eq!(kernel, best.name());
        assert_eq!(note.is_some(), best < Isa::Avx2, "{note:?}");
    }
}
