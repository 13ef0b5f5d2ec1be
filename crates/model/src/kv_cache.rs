//! Per-sequence KV caches. Each sequence owns one [`LayerKv`] per unrolled layer, stored
//! position-major (`[position][kv_head][head_dim]`) so appending a token is one `extend` and
//! truncating (rolling back) is free.

/// K and V of one layer of one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Floats per position (`kv_heads * head_dim`).
    pub(crate) row: usize,
}

impl LayerKv {
    pub fn new(row: usize) -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            row,
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.k.len().checked_div(self.row).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// Drops positions `len..`.
    pub fn truncate(&mut self, len: usize) {
        self.k.truncate(len * self.row);
        self.v.truncate(len * self.row);
    }

    pub(crate) fn push(&mut self, k: &[f32], v: &[f32]) {
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
    }

    /// Bytes held by cached positions.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

/// The KV cache of one sequence: one [`LayerKv`] per unrolled layer.
#[derive(Debug, Clone)]
pub struct SeqCache {
    pub layers: Vec<LayerKv>,
}

impl SeqCache {
    pub fn new(num_layers: usize, kv_row: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::new(kv_row)).collect(),
        }
    }

    /// Positions cached in the first layer (all layers agree for a plain decoder).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}
