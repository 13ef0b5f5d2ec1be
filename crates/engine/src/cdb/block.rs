//! The execute half of a depth-wise step: the block's input rows ([`gather`]) and one pass of
//! the shared block over them ([`run_block`]), each sequence's block table read and written at
//! its unit's loop and at the loops its pending fill writes.

use candle_core::Tensor;
use rrt_model::attention::AttnSegment;
use rrt_model::{FillRows, KvPool, Llama};

use super::plan::StepPlan;
use crate::error::EngineError;
use crate::sequence::Seq;

/// The batch's input rows: one embedding call for the units entering loop 0 (they come first:
/// units are in loop order), then each carried unit's hidden states. `None` without units.
pub(super) fn gather(
    model: &Llama,
    running: &[Seq],
    plan: &StepPlan,
) -> Result<Option<Tensor>, EngineError> {
    if plan.units.is_empty() {
        return Ok(None);
    }
    let entering: Vec<u32> = plan
        .units
        .iter()
        .filter(|u| u.flight.hidden.is_none())
        .flat_map(|u| {
            running[u.seq].tokens[u.flight.start..u.flight.end()]
                .iter()
                .copied()
        })
        .collect();
    let mut parts = Vec::with_capacity(plan.units.len() + 1);
    if !entering.is_empty() {
        parts.push(model.embed(&entering)?);
    }
    parts.extend(plan.units.iter().filter_map(|u| u.flight.hidden.clone()));
    Ok(Some(Tensor::cat(&parts, 0)?))
}

/// Runs every shared layer once over the batch `x_in` (K/V fill rows riding along in each
/// layer's Q|K|V matmul) and returns the output rows; with no units, writes the fills alone.
pub(super) fn run_block(
    model: &Llama,
    running: &[Seq],
    kv: &mut KvPool,
    plan: &StepPlan,
    x_in: Option<&Tensor>,
) -> Result<Option<Tensor>, EngineError> {
    let block = model.block_layers();
    let mut x = x_in.cloned();
    for k in 0..block {
        let groups = plan.groups(block, k);
        let fill_groups = plan.fills.groups(block, k);
        let (segments, fill_segments) = segments(running, plan, (block, model.loops()), k);
        match (&x, &plan.fills.h) {
            (Some(input), h) => {
                let fill = h.as_ref().map(|h| FillRows {
                    h,
                    groups: &fill_groups,
                    segments: &fill_segments,
                });
                x = Some(model.layer_forward_filling(&groups, input, kv, &segments, fill)?);
            }
            (None, Some(h)) => model.fill_kv(h, &fill_groups, kv, &fill_segments)?,
            (None, None) => break,
        }
    }
    Ok(x)
}

/// Each sequence's segments for shared layer `k`: its unit's loop (over the unit's rows) and
/// the loops its fill writes (one fill row each). Segments carry their rows, so their order
/// does not matter.
fn segments<'c>(
    running: &'c [Seq],
    plan: &StepPlan,
    (block, loops): (usize, usize),
    k: usize,
) -> (Vec<AttnSegment<'c>>, Vec<AttnSegment<'c>>) {
    let mut units = Vec::with_capacity(plan.units.len());
    for u in &plan.units {
        units.push(AttnSegment {
            rows: u.rows.clone(),
            start: u.flight.start,
            cache: &running[u.seq].kv,
            // Shared layer k at loop j is unrolled layer j * block + k.
            layer: u.flight.loops_done * block + k,
        });
    }
    let mut fills = Vec::with_capacity(plan.fills.rows());
    for f in &plan.fills.fills {
        for j in f.done..loops {
            fills.push(AttnSegment {
                rows: f.row(j),
                start: f.position,
                cache: &running[f.seq].kv,
                layer: j * block + k,
            });
        }
    }
    (units, fills)
}
