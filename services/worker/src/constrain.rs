//! Constrained requests on this worker: the compiler of the served model's vocabulary is built
//! with the first constrained request (a token trie of the vocabulary: tens of milliseconds),
//! each request's constraint is compiled off the async runtime (or cloned from the compiler's
//! cache) into a matcher the engine masks logits with. A resumed request's matcher first reads
//! the tokens already generated. A simulated worker refuses constraints (its tokens are random).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{counter, histogram};
use rrt_constrain::{Compiler, ConstraintError, Spec};
use rrt_engine::Constraint;
use rrt_model::Tokenizer;
use rrt_proto::v1 as pb;
use rrt_proto::v1::output_constraint::Kind;

use crate::error::WorkerError;

pub(crate) struct Constraints {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    simulated: bool,
    compiler: OnceLock<Result<Arc<Compiler>, ConstraintError>>,
}

/// The constraint of a request as the compiler's spec (validation has checked it names a kind).
pub fn spec_of(c: &pb::OutputConstraint) -> Option<Spec> {
    Some(match c.kind.as_ref()? {
        Kind::JsonSchema(s) => Spec::JsonSchema(s.clone()),
        Kind::JsonObject(_) => Spec::JsonObject,
        Kind::Regex(r) => Spec::Regex(r.clone()),
        Kind::LarkGrammar(g) => Spec::Lark(g.clone()),
    })
}

impl Constraints {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, simulated: bool) -> Self {
        Self {
            tokenizer,
            vocab_size,
            simulated,
            compiler: OnceLock::new(),
        }
    }

    fn compiler(&self) -> Result<Arc<Compiler>, ConstraintError> {
        self.compiler
            .get_or_init(|| {
                let started = Instant::now();
                let c = Compiler::new(self.tokenizer.clone(), self.vocab_size).map(Arc::new);
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    ok = c.is_ok(),
                    "constrained decoding set up for the model's vocabulary"
                );
                c
            })
            .clone()
    }

    /// The matcher of `c`, having read `resumed` (blocking: call off the async runtime).
    pub fn matcher(
        &self,
        worker: &str,
        c: &pb::OutputConstraint,
        resumed: &[u32],
    ) -> Result<Box<dyn Constraint>, WorkerError> {
        let spec = spec_of(c).ok_or_else(|| {
            WorkerError::Constraint(ConstraintError::Invalid {
                kind: "constraint",
                message: "names no kind".into(),
            })
        })?;
        if self.simulated {
            return Err(WorkerError::Constraint(ConstraintError::Invalid {
                kind: spec.kind(),
                message: "this worker is simulated (--simulate): its tokens are random, so it \
                          cannot follow a constraint"
                    .into(),
            }));
        }
        let compiler = self.compiler().map_err(WorkerError::Constraint)?;
        let hits = compiler
            .stats
            .cache_hits
            .load(std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let compiled = compiler.compile(&spec);
        let cached = compiler
            .stats
            .cache_hits
            .load(std::sync::atomic::Ordering::Relaxed)
            > hits;
        let w = worker.to_string();
        if !cached {
            histogram!("rrt_worker_constraint_compile_seconds", "worker" => w.clone(), "kind" => spec.kind())
                .record(started.elapsed().as_secs_f64());
        }
        counter!("rrt_worker_constrained_requests_total", "worker" => w, "kind" => spec.kind(), "compiled" => if cached { "cached" } else { "compiled" })
            .increment(1);
        let mut m = compiled.map_err(WorkerError::Constraint)?;
        if !resumed.is_empty() {
            m.consume(resumed).map_err(|e| {
                WorkerError::Constraint(ConstraintError::Invalid {
                    kind: spec.kind(),
                    message: format!("the resumed tokens do not follow it: {e}"),
                })
            })?;
        }
        Ok(Box::new(m))
    }
}
