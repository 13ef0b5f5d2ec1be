//! One unrolled decoder layer, forward and backward, over a batch of packed sequences: the
//! shared layer's fused projections (one matrix product each for all rows) plus this layer's
//! LoRA deltas, its norms, attention and the SwiGLU MLP. The forward pass keeps what the
//! backward pass reads ([`Saved`]); the backward pass adds the gradients of every trainable
//! tensor it touches into [`Grads`] and returns the gradient of its input.

use rayon::prelude::*;
use rrt_model::kernels::exp_fast;
use rrt_model::kernels::gemm::{MatMut, MatRef};

use crate::precision::{matmul, matmul_left, matmul_right, weight_product, Operand};
use rrt_model::Fused;

use crate::attention::{self, Dims};
use crate::norm;
use crate::params::{Grads, Params, TrainModel, Unrolled};

/// A fused projection's input and its LoRA intermediates `x A^T` (per part, when it has one).
struct ProjSaved {
    x: Vec<f32>,
    lora_t: Vec<Option<Vec<f32>>>,
}

/// What the backward pass of one layer reads.
pub struct Saved {
    x: Vec<f32>,
    r1: Vec<f32>,
    qkv: ProjSaved,
    attn: attention::Saved,
    o: ProjSaved,
    x2: Vec<f32>,
    r2: Vec<f32>,
    gate_up: ProjSaved,
    gu: Vec<f32>,
    down: ProjSaved,
}

/// The model's pieces one layer call needs.
pub struct Ctx<'a> {
    pub model: &'a TrainModel,
    /// Positions per sequence.
    pub t: usize,
}

impl Ctx<'_> {
    fn params(&self) -> &Params {
        &self.model.params
    }

    fn dims(&self) -> Dims {
        let c = &self.model.cfg;
        Dims {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        }
    }

    fn eps(&self) -> f32 {
        self.model.cfg.rms_norm_eps as f32
    }
}

/// `x W^T` plus the layer's LoRA deltas for the parts of `f`; `x` is `[rows, in]`.
fn project(ctx: &Ctx<'_>, u: &Unrolled, f: Fused, x: Vec<f32>) -> (Vec<f32>, ProjSaved) {
    let (cfg, p) = (&ctx.model.cfg, ctx.params());
    let (out, inp) = (f.out_dim(cfg), f.in_dim(cfg));
    let rows = x.len() / inp;
    let wid = ctx.model.shared[u.shared].weight(f);
    let mut y = vec![0f32; rows * out];
    // x is the left operand of the weight's product and of each LoRA part's: packed once.
    let xa = Operand::left(ctx.model, MatRef::new(&x, rows, inp));
    weight_product(
        ctx.model,
        MatMut::new(&mut y, rows, out),
        &xa,
        wid,
        (out, inp),
        true,
    );
    let mut lora_t = Vec::with_capacity(f.parts().len());
    for &part in f.parts() {
        let Some(l) = u.lora[part.index()] else {
            lora_t.push(None);
            continue;
        };
        let (po, off) = (part.shape(cfg)[0], part.fused_offset(cfg));
        let mut t = vec![0f32; rows * l.rank];
        matmul_left(
            ctx.model,
            MatMut::new(&mut t, rows, l.rank),
            &xa,
            MatRef::new(p.get(l.a), l.rank, inp).t(),
            false,
        );
        let b = MatRef::new(p.get(l.b), po, l.rank).t();
        matmul(
            ctx.model.precision,
            MatMut::cols_of(&mut y, rows, out, off..off + po),
            MatRef::new(&t, rows, l.rank),
            b,
            true,
        );
        lora_t.push(Some(t));
    }
    drop(xa);
    (y, ProjSaved { x, lora_t })
}

/// The backward pass of [`project`]: returns `dx` for `dy` (`[rows, out]`), adding the weight's
/// and the LoRA pairs' gradients when they train.
fn project_back(
    ctx: &Ctx<'_>,
    u: &Unrolled,
    f: Fused,
    saved: &ProjSaved,
    dy: &[f32],
    grads: &mut Grads,
) -> Vec<f32> {
    let (cfg, p) = (&ctx.model.cfg, ctx.params());
    let (out, inp) = (f.out_dim(cfg), f.in_dim(cfg));
    let rows = dy.len() / out;
    // x is the right operand of the weight's gradient and of each LoRA A's: packed once.
    let x = Operand::right(ctx.model, MatRef::new(&saved.x, rows, inp));
    let wid = ctx.model.shared[u.shared].weight(f);
    let mut dx = vec![0f32; rows * inp];
    weight_product(
        ctx.model,
        MatMut::new(&mut dx, rows, inp),
        &Operand::left(ctx.model, MatRef::new(dy, rows, out)),
        wid,
        (out, inp),
        false,
    );
    if let Some(dw) = grads.get_mut(wid) {
        matmul_right(
            ctx.model,
            MatMut::new(dw, out, inp),
            MatRef::new(dy, rows, out).t(),
            &x,
            true,
        );
    }
    for (&part, t) in f.parts().iter().zip(&saved.lora_t) {
        let (Some(l), Some(t)) = (u.lora[part.index()], t) else {
            continue;
        };
        let (po, off) = (part.shape(cfg)[0], part.fused_offset(cfg));
        let dyp = MatRef::cols_of(dy, rows, out, off..off + po);
        let t = MatRef::new(t, rows, l.rank);
        if let Some(db) = grads.get_mut(l.b) {
            matmul(
                ctx.model.precision,
                MatMut::new(db, po, l.rank),
                dyp.t(),
                t,
                true,
            );
        }
        let mut dt = vec![0f32; rows * l.rank];
        matmul(
            ctx.model.precision,
            MatMut::new(&mut dt, rows, l.rank),
            dyp,
            MatRef::new(p.get(l.b), po, l.rank),
            false,
        );
        let dt = MatRef::new(&dt, rows, l.rank);
        if let Some(da) = grads.get_mut(l.a) {
            matmul_right(ctx.model, MatMut::new(da, l.rank, inp), dt.t(), &x, true);
        }
        matmul(
            ctx.model.precision,
            MatMut::new(&mut dx, rows, inp),
            dt,
            MatRef::new(p.get(l.a), l.rank, inp),
            true,
        );
    }
    dx
}

/// SwiGLU over `gu` (`[rows, 2f]`, gate then up per row).
fn swiglu(gu: &[f32], f: usize) -> Vec<f32> {
    let mut act = vec![0f32; gu.len() / 2];
    act.par_chunks_mut(f)
        .zip(gu.par_chunks(2 * f))
        .for_each(|(a, row)| {
            let (g, u) = row.split_at(f);
            for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                *a = g / (1.0 + exp_fast(-g)) * u;
            }
        });
    act
}

/// The gradient of `gu` given the gradient of `swiglu(gu)`.
fn swiglu_back(gu: &[f32], dact: &[f32], f: usize) -> Vec<f32> {
    let mut dgu = vec![0f32; gu.len()];
    dgu.par_chunks_mut(2 * f)
        .zip(gu.par_chunks(2 * f))
        .zip(dact.par_chunks(f))
        .for_each(|((d, row), da)| {
            let (g, u) = row.split_at(f);
            let (dg, du) = d.split_at_mut(f);
            for i in 0..f {
                let s = 1.0 / (1.0 + exp_fast(-g[i]));
                du[i] = da[i] * g[i] * s;
                dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    dgu
}

fn add(a: &mut [f32], b: &[f32]) {
    a.par_iter_mut()
        .zip(b.par_iter())
        .for_each(|(a, b)| *a += b);
}

/// Layer `l` over `x` (`[rows, hidden]`): the output and what the backward pass needs.
pub fn forward(ctx: &Ctx<'_>, l: usize, x: Vec<f32>) -> (Vec<f32>, Saved) {
    let (u, p) = (&ctx.model.unrolled[l], ctx.params());
    let f = ctx.model.cfg.intermediate_size;
    let (a, r1) = norm::forward(&x, p.get(u.attn_norm), ctx.eps());
    let (qkv, qkv_saved) = project(ctx, u, Fused::Qkv, a);
    let (out, attn) = attention::forward(&qkv, ctx.dims(), ctx.t, &ctx.model.rope);
    drop(qkv);
    let (o, o_saved) = project(ctx, u, Fused::O, out);
    let mut x2 = o;
    add(&mut x2, &x);
    let (b, r2) = norm::forward(&x2, p.get(u.mlp_norm), ctx.eps());
    let (gu, gate_up) = project(ctx, u, Fused::GateUp, b);
    let act = swiglu(&gu, f);
    let (d, down) = project(ctx, u, Fused::Down, act);
    let mut x3 = d;
    add(&mut x3, &x2);
    let saved = Saved {
        x,
        r1,
        qkv: qkv_saved,
        attn,
        o: o_saved,
        x2,
        r2,
        gate_up,
        gu,
        down,
    };
    (x3, saved)
}

/// The backward pass of layer `l`: the gradient of its input given its output's.
pub fn backward(
    ctx: &Ctx<'_>,
    l: usize,
    saved: &Saved,
    dx3: Vec<f32>,
    grads: &mut Grads,
) -> Vec<f32> {
    let (u, p) = (&ctx.model.unrolled[l], ctx.params());
    let f = ctx.model.cfg.intermediate_size;
    let dact = project_back(ctx, u, Fused::Down, &saved.down, &dx3, grads);
    let dgu = swiglu_back(&saved.gu, &dact, f);
    let db = project_back(ctx, u, Fused::GateUp, &saved.gate_up, &dgu, grads);
    let mut dx2 = norm::backward(
        &saved.x2,
        &saved.r2,
        p.get(u.mlp_norm),
        &db,
        grads.get_mut(u.mlp_norm),
    );
    add(&mut dx2, &dx3);
    let dout = project_back(ctx, u, Fused::O, &saved.o, &dx2, grads);
    let dqkv = attention::backward(&saved.attn, &dout, ctx.dims(), ctx.t, &ctx.model.rope);
    let da = project_back(ctx, u, Fused::Qkv, &saved.qkv, &dqkv, grads);
    let mut dx = norm::backward(
        &saved.x,
        &saved.r1,
        p.get(u.attn_norm),
        &da,
        grads.get_mut(u.attn_norm),
    );
    add(&mut dx, &dx2);
    dx
}
