//! rrt's packed-weight matmul kernels (f32, bf16, int8) vs candle's gemm on the model's
//! projection shapes at decode batch sizes, and this machine's matmul roofline: the best rate
//! either reaches on large shapes.

use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Args;
use rrt_model::kernels::bf16::{matmul_bf16, PackedBf16};
use rrt_model::kernels::q8::{matmul_q8, PackedQ8};
use rrt_model::kernels::{matmul, PackedWeight};

#[derive(Args, Debug)]
pub struct MatmulArgs {
    /// Row counts to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32,64,128,512")]
    rows: Vec<usize>,
}

/// Best-of-`reps` seconds of `f`.
pub fn best_time(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn random(rows: usize, cols: usize) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, (rows, cols), &Device::Cpu)?)
}

/// This machine's f32 matmul peak in GFLOP/s, measured on large Linear-layout shapes (best of
/// several runs each): candle's gemm and rrt's packed kernel separately.
#[derive(Debug, Clone, Copy, Default)]
pub struct Roofline {
    pub candle: f64,
    pub rrt: f64,
}

impl Roofline {
    pub fn max(self, other: Roofline) -> Roofline {
        Roofline {
            candle: self.candle.max(other.candle),
            rrt: self.rrt.max(other.rrt),
        }
    }
}

pub fn roofline() -> anyhow::Result<Roofline> {
    let mut best = Roofline::default();
    for (m, k, n) in [(512, 2048, 2048), (512, 576, 1536), (256, 1536, 576)] {
        let x = random(m, k)?;
        let w = random(n, k)?;
        let flops = 2.0 * (m * k * n) as f64;
        let candle = best_time(8, || {
            x.matmul(&w.t()?)?;
            Ok(())
        })?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let packed = PackedWeight::pack(&w.flatten_all()?.to_vec1::<f32>()?, n, k);
        let ours = best_time(8, || {
            std::hint::black_box(matmul(&xv, m, &packed));
            Ok(())
        })?;
        best = best.max(Roofline {
            candle: flops / candle / 1e9,
            rrt: flops / ours / 1e9,
        });
    }
    Ok(best)
}

pub fn run(args: MatmulArgs) -> anyhow::Result<()> {
    println!(
        "matmul y = x w^T: rrt (weights packed at load: f32, bf16, int8 blocks of 32) vs candle f32 gemm (Linear layout), threads: {}",
        rayon::current_num_threads()
    );
    println!(
        "{:>16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>9} {:>9}",
        "shape n x k",
        "rows",
        "f32 GF/s",
        "bf16 GF/s",
        "q8 GF/s",
        "candle",
        "f32/candle",
        "bf16/f32",
        "q8/f32"
    );
    for (name, n, k) in [
        ("qkv", 960, 576),
        ("down", 576, 1536),
        ("lm_head", 49152, 576),
    ] {
        let w = random(n, k)?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let packed = PackedWeight::pack(&wv, n, k);
        let bf16 = PackedBf16::pack(&wv, n, k);
        let q8 = PackedQ8::quantize(&wv, n, k);
        for &m in &args.rows {
            let x = random(m, k)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let flops = 2.0 * (m * n * k) as f64;
            let ours = best_time(10, || {
                std::hint::black_box(matmul(&xv, m, &packed));
                Ok(())
            })?;
            let half = best_time(10, || {
                std::hint::black_box(matmul_bf16(&xv, m, &bf16));
                Ok(())
            })?;
            let int8 = best_time(10, || {
                std::hint::black_box(matmul_q8(&xv, m, &q8));
                Ok(())
            })?;
            let theirs = best_time(10, || {
                x.matmul(&w.t()?)?;
                Ok(())
            })?;
            println!(
                "{:>16} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>11.2}x {:>8.2}x {:>8.2}x",
                format!("{name} {n}x{k}"),
                m,
                flops / ours / 1e9,
                flops / half / 1e9,
                flops / int8 / 1e9,
                flops / theirs / 1e9,
                theirs / ours,
                ours / half,
                ours / int8
            );
        }
    }
    let r = roofline()?;
    println!(
        "peak on large shapes: candle {:.1} GFLOP/s, rrt {:.1} GFLOP/s",
        r.candle, r.rrt
    );
    decode_step_matmuls(&args.rows)
}

/// SmolLM2-135M's projections per layer (fused Q|K|V, O, fused gate|up, down) as `(n, k)`.
const LAYER_SHAPES: [(usize, usize); 4] = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
const LAYERS: usize = 30;
const LM_HEAD: (usize, usize) = (49152, 576);
/// One of a step's matmuls (by index) on its input rows.
type StepMatmul<'a> = dyn Fn(usize, &[f32]) -> Vec<f32> + 'a;

/// Rounds over the dtypes in [`decode_step_matmuls`].
const STEP_ROUNDS: usize = 8;

/// The matmuls of one decode step of SmolLM2-135M (30 layers' projections and the LM head, each
/// with weights of its own, so every pass streams them from memory as decoding does), per
/// dtype: what the kernels alone reach in the model's many small calls, against this machine's
/// read bandwidth. The rest of a decode step (attention, norms, sampling) is not here.
fn decode_step_matmuls(rows: &[usize]) -> anyhow::Result<()> {
    let bandwidth = read_bandwidth();
    println!(
        "\none decode step's matmuls (SmolLM2-135M: {LAYERS} layers x {} projections + the LM head, distinct weights); memory read bandwidth {:.1} GB/s ({} threads summing 512 MiB)",
        LAYER_SHAPES.len(),
        bandwidth / 1e9,
        rayon::current_num_threads()
    );
    let shapes: Vec<(usize, usize)> = (0..LAYERS)
        .flat_map(|_| LAYER_SHAPES)
        .chain([LM_HEAD])
        .collect();
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(n, k)| Ok(random(n, k)?.flatten_all()?.to_vec1::<f32>()?))
        .collect::<anyhow::Result<_>>()?;
    let f32w: Vec<PackedWeight> = shapes
        .iter()
        .zip(&weights)
        .map(|(&(n, k), w)| PackedWeight::pack(w, n, k))
        .collect();
    let bf16w: Vec<PackedBf16> = shapes
        .iter()
        .zip(&weights)
        .map(|(&(n, k), w)| PackedBf16::pack(w, n, k))
        .collect();
    let q8w: Vec<PackedQ8> = shapes
        .iter()
        .zip(&weights)
        .map(|(&(n, k), w)| PackedQ8::quantize(w, n, k))
        .collect();
    drop(weights);
    let params: usize = shapes.iter().map(|(n, k)| n * k).sum();
    let bytes = [4.0, 2.0, 1.125].map(|b| b * params as f64);
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>14}",
        "rows", "f32 ms", "bf16 ms", "q8 ms", "bf16/f32", "q8/f32", "GB/s f32/bf16/q8"
    );
    for &m in rows.iter().filter(|&&m| m <= 64) {
        let inputs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(_, k)| Ok(random(m, k)?.flatten_all()?.to_vec1::<f32>()?))
            .collect::<anyhow::Result<_>>()?;
        let kernels: [&StepMatmul; 3] = [
            &|i, x| matmul(x, m, &f32w[i]),
            &|i, x| matmul_bf16(x, m, &bf16w[i]),
            &|i, x| matmul_q8(x, m, &q8w[i]),
        ];
        // The dtypes take turns, one pass each a round, and keep their best: a slow spell of
        // this shared machine lands on all of them.
        let mut t = [f64::INFINITY; 3];
        for _ in 0..STEP_ROUNDS {
            for (best, f) in t.iter_mut().zip(&kernels) {
                let started = Instant::now();
                for (i, x) in inputs.iter().enumerate() {
                    std::hint::black_box(f(i, x));
                }
                *best = best.min(started.elapsed().as_secs_f64());
            }
        }
        println!(
            "{:>5} {:>10.2} {:>10.2} {:>10.2} {:>8.2}x {:>8.2}x {:>14}",
            m,
            t[0] * 1e3,
            t[1] * 1e3,
            t[2] * 1e3,
            t[0] / t[1],
            t[0] / t[2],
            format!(
                "{:.0}/{:.0}/{:.0}",
                bytes[0] / t[0] / 1e9,
                bytes[1] / t[1] / 1e9,
                bytes[2] / t[2] / 1e9
            )
        );
    }
    Ok(())
}

/// Bytes per second the threads read from memory, summing a buffer larger than any cache
/// (best of 5).
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf: Vec<u64> = (0..64u64 << 20).collect();
    let secs = best_time(5, || {
        let sum = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        Ok(())
    })
    .unwrap_or(f64::INFINITY);
    (buf.len() * 8) as f64 / secs
}
