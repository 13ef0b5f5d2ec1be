//! The sequential reference for early exit: one sequence, one token at a time, loop by loop,
//! applying exit depths from a trace and filling skipped K/V the same way the engine does. The
//! batched schedulers are tested against it; it shares only the model's layer calls with them.

use candle_core::Tensor;
use rrt_model::attention::AttnSegment;
use rrt_model::{BatchItem, KvPool, Llama, Logits, RowGroup, Sampler, SeqCache};

use crate::error::EngineError;
use crate::exit::KvFill;
use crate::request::GenParams;
use crate::trace::ExitTrace;

/// Generates for `prompt` (request `id`), exiting each generated token after the loop `trace`
/// names (full depth where it names none). Returns `(token, exit_loop)` pairs.
pub fn generate_with_exits(
    model: &Llama,
    id: u64,
    prompt: &[u32],
    params: &GenParams,
    trace: &ExitTrace,
    fill: KvFill,
) -> Result<Vec<(u32, usize)>, EngineError> {
    let loops = model.loops();
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    let mut tokens = prompt.to_vec();
    let logits = model.forward(
        &mut kv,
        &mut [BatchItem {
            tokens: prompt,
            offset: 0,
            cache: &mut cache,
            logits: Logits::Last,
        }],
    )?;
    let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
    let mut exit_loop = loops;
    let mut out = Vec::new();
    loop {
        let next = match params.forced.get(out.len()) {
            Some(&forced) => forced,
            None => sampler.sample(&row, &tokens),
        };
        if params.stop_tokens.contains(&next) {
            break;
        }
        out.push((next, exit_loop));
        tokens.push(next);
        if out.len() >= params.max_new_tokens {
            break;
        }
        let pos = tokens.len() - 1;
        let depth = trace
            .get(id, pos - prompt.len())
            .unwrap_or(loops)
            .clamp(1, loops);
        let h = run_token(model, &mut kv, &mut cache, next, pos, depth, fill)?;
        row = model
            .logits(&model.exit_input(depth, &h)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        exit_loop = depth;
    }
    Ok(out)
}

/// Runs `token` at `pos` through the first `depth` loops, one layer at a time, and fills the
/// K/V of the loops it skips; returns its exit hidden state.
fn run_token(
    model: &Llama,
    kv: &mut KvPool,
    cache: &mut SeqCache,
    token: u32,
    pos: usize,
    depth: usize,
    fill: KvFill,
) -> Result<Tensor, EngineError> {
    let (block, loops) = (model.block_layers(), model.loops());
    let one = |l: usize| RowGroup {
        rows: 0..1,
        unrolled: l,
    };
    kv.reserve(cache, pos + 1)?;
    let mut h = model.embed(&[token])?;
    for l in 0..depth * block {
        h = model.layer_forward(&[one(l)], &h, kv, &[segment(cache, l, pos)])?;
    }
    for l in depth * block..loops * block {
        match fill {
            KvFill::Propagate => model.fill_kv(&h, &[one(l)], kv, &[segment(cache, l, pos)])?,
            KvFill::Copy => {
                let (k, v) = kv.read(cache, (depth - 1) * block + l % block, pos)?;
                kv.write(cache, l, pos, &k, &v)?;
            }
        }
    }
    Ok(h)
}

/// One row at `pos` attending through unrolled layer `l` of `cache`.
fn segment(cache: &SeqCache, l: usize, pos: usize) -> AttnSegment<'_> {
    AttnSegment {
        rows: 0..1,
        start: pos,
        cache,
        layer: l,
    }
}
