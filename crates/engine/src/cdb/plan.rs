//! The plan of one depth-wise step, as data: which units run (each sequence's carried unit, or
//! a new one under the row budget, decode tokens before prompt chunks), in loop order so each
//! loop's rows are one contiguous [`RowGroup`], and which K/V fill rows ride along. Planning
//! takes each unit's [`Flight`] out of its sequence; the step owns it until commit.

use std::ops::Range;

use candle_core::Tensor;
use rrt_model::RowGroup;

use crate::error::EngineError;
use crate::sequence::{Flight, PendingFill, Seq, Stage};
use crate::step::decode_first;

/// One sequence's tokens in this step's batch.
pub(super) struct Unit {
    /// Index of the sequence among the running ones.
    pub seq: usize,
    pub flight: Flight,
    /// The unit's rows in the batch.
    pub rows: Range<usize>,
}

impl Unit {
    /// The row whose logits matter (the unit's last token).
    pub fn last_row(&self) -> usize {
        self.rows.end - 1
    }
}

/// K/V rows of one sequence's pending fill: one per skipped loop.
pub(super) struct Fill {
    pub seq: usize,
    pub position: usize,
    /// Loops `done..` are filled.
    pub done: usize,
    /// The fill's first row among the step's fill rows (its row for loop `done`).
    pub first_row: usize,
}

impl Fill {
    /// The fill row of loop `j` (`j >= done`).
    pub fn row(&self, j: usize) -> Range<usize> {
        let r = self.first_row + j - self.done;
        r..r + 1
    }
}

/// The K/V rows early exits of earlier steps left to write (state propagation), in running
/// order then loop order, written by this step's block pass alongside its own rows.
pub(super) struct FillPlan {
    pub fills: Vec<Fill>,
    /// The loop of each fill row.
    row_loops: Vec<usize>,
    /// The exit hidden state of each fill row, `[rows, hidden]`.
    pub h: Option<Tensor>,
}

impl FillPlan {
    fn take(running: &mut [Seq], loops: usize) -> Result<Self, EngineError> {
        let (mut fills, mut row_loops, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, s) in running.iter_mut().enumerate() {
            let Some(PendingFill {
                hidden,
                position,
                done,
            }) = s.fill.take()
            else {
                continue;
            };
            if s.is_done() {
                continue;
            }
            fills.push(Fill {
                seq,
                position,
                done,
                first_row: row_loops.len(),
            });
            for j in done..loops {
                row_loops.push(j);
                parts.push(hidden.clone());
            }
        }
        let h = if parts.is_empty() {
            None
        } else {
            Some(Tensor::cat(&parts, 0)?)
        };
        Ok(Self {
            fills,
            row_loops,
            h,
        })
    }

    pub fn rows(&self) -> usize {
        self.row_loops.len()
    }

    /// Row groups of shared layer `k`: consecutive rows at the same loop share one.
    pub fn groups(&self, block: usize, k: usize) -> Vec<RowGroup> {
        group_runs(self.row_loops.iter().map(|&j| (j, 1)), block, k)
    }
}

/// One step's work.
pub(super) struct StepPlan {
    /// In loop order (running order within a loop).
    pub units: Vec<Unit>,
    pub fills: FillPlan,
}

impl StepPlan {
    /// Takes every carried unit and pending fill out of `running` and starts new units in the
    /// rows the carried ones leave of `max_rows` (decode tokens first, then prompt chunks).
    pub fn take(running: &mut [Seq], max_rows: usize, loops: usize) -> Result<Self, EngineError> {
        let mut flights = take_carried(running);
        let carried: usize = flights.iter().flatten().map(|f| f.len).sum();
        start_units(running, &mut flights, max_rows.saturating_sub(carried));
        let mut order: Vec<(usize, Flight)> = flights
            .into_iter()
            .enumerate()
            .filter_map(|(i, f)| Some((i, f?)))
            .collect();
        order.sort_by_key(|(_, f)| f.loops_done);
        let mut row = 0;
        let units = order
            .into_iter()
            .map(|(seq, flight)| {
                row += flight.len;
                Unit {
                    seq,
                    rows: row - flight.len..row,
                    flight,
                }
            })
            .collect();
        Ok(Self {
            units,
            fills: FillPlan::take(running, loops)?,
        })
    }

    /// Rows of the batch (fill rows not counted).
    pub fn rows(&self) -> usize {
        self.units.last().map_or(0, |u| u.rows.end)
    }

    /// Row groups of shared layer `k`: units at the same loop share one.
    pub fn groups(&self, block: usize, k: usize) -> Vec<RowGroup> {
        group_runs(
            self.units
                .iter()
                .map(|u| (u.flight.loops_done, u.flight.len)),
            block,
            k,
        )
    }

    /// Rows at each loop depth.
    pub fn rows_per_depth(&self, loops: usize) -> Vec<usize> {
        let mut rows = vec![0; loops];
        for u in &self.units {
            rows[u.flight.loops_done] += u.flight.len;
        }
        rows
    }
}

/// Each sequence's carried unit, taken out of it (the step owns it until commit).
fn take_carried(running: &mut [Seq]) -> Vec<Option<Flight>> {
    running
        .iter_mut()
        .map(|s| match std::mem::replace(&mut s.stage, Stage::Ready) {
            Stage::Carried(f) => Some(f),
            Stage::Ready => None,
            Stage::Done => {
                s.stage = Stage::Done;
                None
            }
        })
        .collect()
}

/// New units for sequences without one, within `budget` rows: decode tokens first (one row
/// each), then prompt chunks.
fn start_units(running: &[Seq], flights: &mut [Option<Flight>], budget: usize) {
    let takes = decode_first(running, |i| flights[i].is_some(), budget);
    for ((s, flight), take) in running.iter().zip(flights.iter_mut()).zip(takes) {
        if take > 0 {
            *flight = Some(Flight::enter(s.computed, take));
        }
    }
}

/// Row groups from consecutive `(loop, rows)` runs: shared layer `k` at loop `j` is unrolled
/// layer `j * block + k`.
fn group_runs(runs: impl Iterator<Item = (usize, usize)>, block: usize, k: usize) -> Vec<RowGroup> {
    let mut groups: Vec<RowGroup> = Vec::new();
    let mut row = 0;
    for (j, len) in runs {
        let unrolled = j * block + k;
        match groups.last_mut() {
            Some(g) if g.unrolled == unrolled => g.rows.end += len,
            _ => groups.push(RowGroup {
                rows: row..row + len,
                unrolled,
            }),
        }
        row += len;
    }
    groups
}
