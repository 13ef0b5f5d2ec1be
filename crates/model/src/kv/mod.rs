//! Paged KV memory: every sequence's K and V live in fixed-size blocks of one pool
//! ([`KvPool`]), found through the sequence's block table ([`SeqCache`]), as vLLM's
//! PagedAttention does. A block holds [`KvLayout::block_tokens`] positions of *every* unrolled
//! layer, so one table serves all layers and loops of a recursive model.
//!
//! - [`store`]: the bytes (f32, bf16, or int8 with per-position scales), their layout inside a block, the reads attention makes
//!   and the writes appending K/V makes.
//! - [`pool`]: blocks as a resource: allocation (free blocks first, then the least recently
//!   used cached block), reference counts, the prefix cache (full blocks keyed by a hash chain
//!   of their tokens, shared read-only) and the rule that a shared or cached block is never
//!   written.
//! - [`hash`]: the block hash chain.
//!
//! Inside a block, per layer, K is stored in tiles of [`KV_TILE`] positions transposed within
//! the tile (`[tile][kv_head * head_dim][16]`: attention scores 16 positions with 16-lane FMAs
//! and no horizontal sums), then V position-major (`[position][kv_head * head_dim]`, the layout
//! the weighted sum reads). A block is therefore a whole number of K tiles.

pub mod hash;
pub mod pool;
pub mod store;

pub use hash::{block_hash, root_hash};
pub use pool::{KvPool, PoolStats, PrefixHit, SeqCache};
pub use store::KvDtype;

use crate::error::{ModelError, Result};

/// Positions per K tile: one AVX-512 vector of scores. Block sizes are multiples of it.
pub const KV_TILE: usize = 16;

/// Positions per block unless configured: the usual size (vLLM's default); 16, 32 and 64 were
/// measured (docs/performance.md).
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// Index of a block in its pool.
pub type BlockId = u32;

/// The shape of a pool's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Unrolled layers (every loop of a recursive model has its own K/V).
    pub layers: usize,
    /// Floats of K (and of V) per position and layer: `kv_heads * head_dim`.
    pub row: usize,
    /// Positions per block: a positive multiple of [`KV_TILE`].
    pub block_tokens: usize,
    pub dtype: KvDtype,
    /// Features of a row that share one int8 scale per position: a KV head
    /// ([`KvLayout::with_scale_group`]; the whole row unless set).
    pub scale_group: usize,
}

impl KvLayout {
    /// A layout, or what is wrong with it (a block size the kernels' K tiles do not divide).
    pub fn new(layers: usize, row: usize, block_tokens: usize, dtype: KvDtype) -> Result<Self> {
        if block_tokens == 0 || !block_tokens.is_multiple_of(KV_TILE) {
            return Err(ModelError::InvalidInput(format!(
                "KV block size {block_tokens} is not a positive multiple of {KV_TILE} positions \
                 (the attention kernels read K in tiles of {KV_TILE})"
            )));
        }
        if layers == 0 || row == 0 {
            return Err(ModelError::InvalidInput(format!(
                "KV layout of {layers} layers x {row} floats a position is empty"
            )));
        }
        Ok(Self {
            layers,
            row,
            block_tokens,
            dtype,
            scale_group: row,
        })
    }

    /// The layout with one int8 scale per position for every `features` of a row (a KV head's
    /// `head_dim`: attention then applies one scale per position and head), or what is wrong.
    pub fn with_scale_group(self, features: usize) -> Result<Self> {
        if features == 0 || !self.row.is_multiple_of(features) {
            return Err(ModelError::InvalidInput(format!(
                "KV scale group of {features} features does not divide a row of {}",
                self.row
            )));
        }
        Ok(Self {
            scale_group: features,
            ..self
        })
    }

    /// Scale groups in a row.
    pub fn groups(&self) -> usize {
        self.row / self.scale_group
    }

    /// Scales of one layer of one block (K then V; none unless int8).
    pub fn layer_block_scales(&self) -> usize {
        match self.dtype {
            KvDtype::Int8 => 2 * self.block_tokens * self.groups(),
            _ => 0,
        }
    }

    /// Elements of one layer of one block (K then V).
    pub fn layer_block_elems(&self) -> usize {
        2 * self.block_tokens * self.row
    }

    /// Bytes one position costs, every layer, K and V.
    pub fn bytes_per_token(&self) -> usize {
        let scales = self.layer_block_scales() / self.block_tokens * std::mem::size_of::<f32>();
        self.layers * (2 * self.row * self.dtype.size() + scales)
    }

    /// Bytes of one block, every layer.
    pub fn block_bytes(&self) -> usize {
        self.block_tokens * self.bytes_per_token()
    }

    /// Blocks that hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_tokens)
    }
}
