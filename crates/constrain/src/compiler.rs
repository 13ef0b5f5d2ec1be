//! Compiling constraints: one llguidance parser factory per model vocabulary; each distinct
//! constraint text is compiled once and kept (least recently used first out), and every
//! request gets a fresh matcher cloned from it. Compile time and cache hits are counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llguidance::{Matcher, ParserFactory};
use rrt_model::Tokenizer;

use crate::matcher::SpecMatcher;
use crate::spec::{ConstraintError, Spec};
use crate::vocab::token_env;

/// Compiled constraints kept.
pub const CACHE_ENTRIES: usize = 64;

/// Counters since start.
#[derive(Debug, Default)]
pub struct CompileStats {
    pub compiles: AtomicU64,
    pub compile_ns: AtomicU64,
    pub cache_hits: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Compiler {
    factory: ParserFactory,
    vocab_size: usize,
    cache: Mutex<VecDeque<(Spec, Matcher)>>,
    pub stats: Arc<CompileStats>,
}

impl Compiler {
    /// A compiler for a model with `vocab_size` logits and `tokenizer`.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, ConstraintError> {
        let env = token_env(tokenizer, vocab_size)?;
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Setup(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory,
            vocab_size,
            cache: Mutex::new(VecDeque::new()),
            stats: Arc::default(),
        })
    }

    /// A fresh matcher of `spec` (compiled now, or cloned from the cache).
    pub fn compile(&self, spec: &Spec) -> Result<SpecMatcher, ConstraintError> {
        let cached = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let found = cache.iter().position(|(s, _)| s == spec);
            found.and_then(|i| cache.remove(i)).map(|entry| {
                let fresh = entry.1.deep_clone();
                cache.push_front(entry);
                fresh
            })
        };
        if let Some(m) = cached {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(SpecMatcher::new(m, self.vocab_size));
        }
        let started = Instant::now();
        let compiled = spec.grammar().and_then(|g| {
            let parser = self.factory.create_parser(g);
            let m = Matcher::new(parser);
            match m.get_error() {
                Some(e) => Err(spec.compile_error(e)),
                None => Ok(m),
            }
        });
        self.stats
            .compile_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let m = match compiled {
            Ok(m) => m,
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.stats.compiles.fetch_add(1, Ordering::Relaxed);
        let fresh = m.deep_clone();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.push_front((spec.clone(), m));
        cache.truncate(CACHE_ENTRIES);
        Ok(SpecMatcher::new(fresh, self.vocab_size))
    }
}
