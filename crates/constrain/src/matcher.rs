//! One request's llguidance matcher as the engine's [`rrt_engine::Constraint`].

use llguidance::Matcher;

/// A request's matcher.
pub struct SpecMatcher {
    m: Matcher,
    vocab_size: usize,
}

impl SpecMatcher {
    pub(crate) fn new(m: Matcher, vocab_size: usize) -> Self {
        Self { m, vocab_size }
    }

    /// Feeds tokens an earlier attempt of the request already generated (a resumed request).
    pub fn consume(&mut self, tokens: &[u32]) -> Result<(), String> {
        self.m.consume_tokens(tokens).map_err(|e| e.to_string())
    }

    /// Whether the output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.m.is_accepting().unwrap_or(false)
    }
}

impl rrt_engine::Constraint for SpecMatcher {
    fn mask(&mut self) -> Result<Vec<u32>, String> {
        let v = self.m.compute_mask().map_err(|e| e.to_string())?;
        let mut words = v.as_slice().to_vec();
        words.resize(self.vocab_size.div_ceil(32), 0);
        Ok(words)
    }

    fn commit(&mut self, token: u32) -> Result<bool, String> {
        self.m.consume_token(token).map_err(|e| e.to_string())?;
        Ok(self.m.is_stopped())
    }

    fn forced(&mut self) -> Result<(Vec<u32>, bool), String> {
        let forced = self.m.consume_ff_tokens();
        if let Some(e) = self.m.get_error() {
            return Err(e);
        }
        Ok((forced, self.m.is_stopped()))
    }
}
