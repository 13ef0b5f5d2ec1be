//! The model's vocabulary as llguidance sees it: a token trie of every token's bytes (read
//! from the tokenizer's JSON form, special tokens marked as llguidance marks them), sized to
//! the model's logits, with the model's end-of-sequence token; bytes are tokenized by the
//! model's own tokenizer.

use std::sync::Arc;

use rrt_model::Tokenizer;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::spec::ConstraintError;

struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode_plain(&text) {
            Ok(ids) => ids,
            // Only for text the grammar forces; the trie's greedy split is a fine fallback.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The token environment of a model whose logits have `vocab_size` entries.
pub fn token_env(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<TokEnv, ConstraintError> {
    let json = tokenizer
        .to_json()
        .map_err(|e| ConstraintError::Setup(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| ConstraintError::Setup(e.to_string()))?;
    let mut words = llguidance::token_bytes_from_tokenizer_json(&value)
        .map_err(|e| ConstraintError::Setup(format!("reading the vocabulary: {e}")))?;
    if words.len() > vocab_size {
        return Err(ConstraintError::Setup(format!(
            "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
            words.len()
        )));
    }
    // Logit rows beyond the tokenizer's tokens (padding) are never allowed: empty words.
    words.resize(vocab_size, Vec::new());
    let eos = tokenizer.eos.first().copied().ok_or_else(|| {
        ConstraintError::Setup("the model has no end-of-sequence token".to_string())
    })?;
    let info = TokRxInfo {
        vocab_size: vocab_size as u32,
        tok_eos: eos,
        tok_bos: None,
        tok_pad: None,
        tok_unk: None,
        tok_end_of_turn: None,
    };
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(Env { trie, tokenizer }))
}
