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
    Ok(())
}
