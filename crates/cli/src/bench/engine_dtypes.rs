//! `rrt bench engine --dtypes f32,bf16,q8`: the engine's main rows (vanilla static and CSB, the
//! recursive model's CSB, CDB without exits and CDB with synthetic exits) at each weight dtype,
//! side by side in one run. Each dtype's models are repacked from the same f32 weights; every
//! row of every dtype runs once per round, rounds interleaved, the best kept, so the VM's drift
//! lands on all dtypes alike. Prints tokens/s, the ratio to the first dtype, and how many greedy
//! tokens agree with the first dtype's.

use rrt_engine::{ExitKind, ExitPolicy, KvFill, Scheduler};
use rrt_model::{Llama, WeightDtype};

use crate::bench::engine_runs::{agreement, run, synthetic_trace, Run, Spec, TraceFrom, Workload};

/// What the dtype table measures and how.
pub struct DtypeTable<'a> {
    pub dtypes: &'a [WeightDtype],
    /// The vanilla model and the recursive one, both held in f32.
    pub vanilla: &'a Llama,
    pub recursive: (&'a str, &'a Llama),
    /// Shares of tokens that exit after loop 1 (synthetic traces).
    pub synthetic: &'a [f64],
    pub seed: u64,
    pub repeats: usize,
    pub limits: (usize, usize),
}

fn spec(name: String, scheduler: Scheduler, trace: TraceFrom) -> Spec {
    let exit = match trace {
        TraceFrom::None => ExitPolicy::NONE,
        _ => ExitPolicy {
            kind: ExitKind::Replay,
            threshold: 0.0,
        },
    };
    Spec {
        name,
        scheduler,
        exit,
        fill: KvFill::Propagate,
        trace,
    }
}

/// The rows: `(runs on the recursive model, spec)`.
fn rows(t: &DtypeTable) -> Vec<(bool, Spec)> {
    let layers = t.vanilla.layers.len();
    let mut rows = vec![
        (
            false,
            spec(
                format!("vanilla {layers} layers, static"),
                Scheduler::Static,
                TraceFrom::None,
            ),
        ),
        (
            false,
            spec(
                format!("vanilla {layers} layers, CSB"),
                Scheduler::Csb,
                TraceFrom::None,
            ),
        ),
        (
            true,
            spec("recursive: CSB".into(), Scheduler::Csb, TraceFrom::None),
        ),
        (
            true,
            spec(
                "recursive: CDB, no exit".into(),
                Scheduler::Cdb,
                TraceFrom::None,
            ),
        ),
    ];
    for &p in t.synthetic {
        rows.push((
            true,
            spec(
                format!(
                    "recursive: CDB, synthetic: {:.0}% exit after loop 1",
                    100.0 * p
                ),
                Scheduler::Cdb,
                TraceFrom::Synthetic(p),
            ),
        ));
    }
    rows
}

/// Runs the table and prints it.
pub fn run_table(t: &DtypeTable, w: &Workload) -> anyhow::Result<()> {
    anyhow::ensure!(!t.dtypes.is_empty(), "--dtypes names no dtype");
    let mut models = Vec::new();
    for &dtype in t.dtypes {
        let (mut vanilla, mut recursive) = (t.vanilla.clone(), t.recursive.1.clone());
        vanilla.set_weight_dtype(dtype)?;
        recursive.set_weight_dtype(dtype)?;
        models.push((dtype, vanilla, recursive));
    }
    let rows = rows(t);
    // runs[d][r]: dtype d, row r.
    let mut runs: Vec<Vec<Option<Run>>> = vec![vec![None; rows.len()]; models.len()];
    for round in 0..t.repeats.max(1) {
        eprintln!("dtype rounds: {}/{}", round + 1, t.repeats.max(1));
        for (r, (on_recursive, spec)) in rows.iter().enumerate() {
            for (d, (_, vanilla, recursive)) in models.iter().enumerate() {
                let model = if *on_recursive { recursive } else { vanilla };
                let trace = match spec.trace {
                    TraceFrom::Synthetic(p) => Some(synthetic_trace(w, p, model.loops(), t.seed)),
                    _ => None,
                };
                let got = run(model, w, spec, trace.as_ref(), t.limits, false)?;
                match &mut runs[d][r] {
                    Some(best) => best.add_round(got),
                    slot => *slot = Some(got),
                }
            }
        }
    }
    let runs: Vec<Vec<Run>> = runs
        .into_iter()
        .map(|row| row.into_iter().map(|r| r.expect("every row ran")).collect())
        .collect();
    print!("{}", render(t, &models, &rows, &runs));
    Ok(())
}

fn render(
    t: &DtypeTable,
    models: &[(WeightDtype, Llama, Llama)],
    rows: &[(bool, Spec)],
    runs: &[Vec<Run>],
) -> String {
    let base = t.dtypes[0];
    let mut out = format!(
        "\nengine throughput per weight dtype ({}; best of {} interleaved round(s); ratios and greedy-token agreement against {base}):\n",
        t.recursive.0,
        t.repeats.max(1)
    );
    out += "| row |";
    for (dtype, ..) in models {
        out += &format!(" {dtype} ({}) |", dtype.cpu_note().0);
    }
    out += "\n|---|";
    out += &"---|".repeat(models.len());
    out += "\n";
    let mib = |m: &Llama| m.weight_bytes() as f64 / (1024.0 * 1024.0);
    type Pick = fn(&(WeightDtype, Llama, Llama)) -> &Llama;
    let weights: [(&str, Pick); 2] = [
        ("weights: vanilla", |m| &m.1),
        ("weights: recursive", |m| &m.2),
    ];
    for (label, pick) in weights {
        out += &format!("| {label} |");
        let base_bytes = mib(pick(&models[0]));
        for m in models {
            let b = mib(pick(m));
            out += &format!(" {b:.1} MiB ({:.2}x) |", b / base_bytes);
        }
        out += "\n";
    }
    for (r, (_, spec)) in rows.iter().enumerate() {
        out += &format!("| {} |", spec.name);
        let first = &runs[0][r];
        for (d, row) in runs.iter().enumerate() {
            let run = &row[r];
            let ratio = run.tokens_per_s / first.tokens_per_s;
            if d == 0 {
                out += &format!(" {:.1} tok/s (1.00x) |", run.tokens_per_s);
            } else {
                out += &format!(
                    " {:.1} tok/s ({ratio:.2}x; {:.1}% agree) |",
                    run.tokens_per_s,
                    100.0 * agreement(&run.outputs, &first.outputs)
                );
            }
        }
        out += "\n";
    }
    out
}
