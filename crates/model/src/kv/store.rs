//! The bytes of a pool: one region per layer, each a run of blocks (`[block][K tiles | V rows]`),
//! so a sequence whose blocks are consecutive reads each layer's K and V as one stream, as the
//! contiguous cache did. Elements are f32, bf16 or int8 ([`KvDtype`]); attention reads each
//! through [`KvElem`], converting to f32 as it loads. Int8 elements come with an f32 scale per
//! position and scale group (a KV head: [`KvLayout::scale_group`]) in a region of their own
//! (`[block][K scales | V scales]`, each `[group][position]`), which attention applies to a
//! position's scores (K) and weights (V) rather than to every element.

use crate::kernels::bf16::{from_bf16, to_bf16};

use super::{BlockId, KvLayout, KV_TILE};

/// How K and V elements are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    /// Half the bytes of f32 (rounded to nearest even); attention widens as it reads.
    Bf16,
    /// A byte an element, symmetric, scaled per position and KV head by its largest magnitude
    /// / 127 (rounded to nearest): a little over a quarter of f32's bytes.
    Int8,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Int8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "bf16" => Ok(KvDtype::Bf16),
            "int8" => Ok(KvDtype::Int8),
            _ => Err(format!(
                "unknown KV dtype {s:?} (expected f32, bf16 or int8)"
            )),
        }
    }
}

/// An element of a KV store.
pub(crate) trait KvElem: Copy + Default + Send + Sync + 'static {
    /// Whether elements hold `value / scale` with a scale per position and group.
    const SCALED: bool = false;
    fn load(self) -> f32;
    /// The element of `v` (already divided by its scale when [`KvElem::SCALED`]).
    fn from_f32(v: f32) -> Self;
}

impl KvElem for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// bf16 bits.
impl KvElem for u16 {
    #[inline(always)]
    fn load(self) -> f32 {
        from_bf16(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        to_bf16(v)
    }
}

/// Int8: `round(value / scale)` in -127..=127.
impl KvElem for i8 {
    const SCALED: bool = true;
    #[inline(always)]
    fn load(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v.round().clamp(-127.0, 127.0) as i8
    }
}

/// Per-layer regions of one element type.
#[derive(Debug, Clone)]
pub(crate) struct Regions<T> {
    pub layers: Vec<Vec<T>>,
}

/// The elements of every block, by dtype.
#[derive(Debug, Clone)]
pub(crate) enum KvData {
    F32(Regions<f32>),
    Bf16(Regions<u16>),
    /// The elements and their scales.
    Int8(Regions<i8>, Regions<f32>),
}

/// The storage of a pool's blocks.
#[derive(Debug, Clone)]
pub(crate) struct KvStore {
    pub layout: KvLayout,
    pub data: KvData,
    blocks: usize,
}

impl KvStore {
    /// Zeroed storage for `blocks` blocks (the pages are mapped by the OS when first written,
    /// so an unused part of a large pool costs address space, not memory).
    pub fn new(layout: KvLayout, blocks: usize) -> Self {
        let per_layer = blocks * layout.layer_block_elems();
        let data = match layout.dtype {
            KvDtype::F32 => KvData::F32(Regions {
                layers: (0..layout.layers).map(|_| vec![0.0; per_layer]).collect(),
            }),
            KvDtype::Bf16 => KvData::Bf16(Regions {
                layers: (0..layout.layers).map(|_| vec![0; per_layer]).collect(),
            }),
            KvDtype::Int8 => {
                let scales = blocks * layout.layer_block_scales();
                KvData::Int8(
                    Regions {
                        layers: (0..layout.layers).map(|_| vec![0; per_layer]).collect(),
                    },
                    Regions {
                        layers: (0..layout.layers).map(|_| vec![0.0; scales]).collect(),
                    },
                )
            }
        };
        Self {
            layout,
            data,
            blocks,
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Grows the storage to `blocks` blocks (a growable pool; nothing may borrow it).
    pub fn grow(&mut self, blocks: usize) {
        if blocks <= self.blocks {
            return;
        }
        let per_layer = blocks * self.layout.layer_block_elems();
        match &mut self.data {
            KvData::F32(r) => r.layers.iter_mut().for_each(|l| l.resize(per_layer, 0.0)),
            KvData::Bf16(r) => r.layers.iter_mut().for_each(|l| l.resize(per_layer, 0)),
            KvData::Int8(r, scales) => {
                r.layers.iter_mut().for_each(|l| l.resize(per_layer, 0));
                let n = blocks * self.layout.layer_block_scales();
                scales.layers.iter_mut().for_each(|l| l.resize(n, 0.0));
            }
        }
        self.blocks = blocks;
    }

    /// Writes K and V of one position (`slot` inside `block`) of `layer`.
    pub fn write(&mut self, layer: usize, block: BlockId, slot: usize, k: &[f32], v: &[f32]) {
        let layout = self.layout;
        match &mut self.data {
            KvData::F32(r) => write_position(&mut r.layers[layer], layout, block, slot, k, v),
            KvData::Bf16(r) => write_position(&mut r.layers[layer], layout, block, slot, k, v),
            KvData::Int8(r, scales) => {
                // Each group quantized straight into place (this runs for every row and layer).
                let (g, step) = (layout.scale_group, layout.block_tokens);
                let (k_scale, v_scale) = scales_at(layout, block, slot);
                let (k_at, v_at) = position_at(layout, block, slot);
                let (region, s) = (&mut r.layers[layer], &mut scales.layers[layer]);
                for (i, (kg, vg)) in k.chunks(g).zip(v.chunks(g)).enumerate() {
                    let (ks, k_inv) = scale_of(kg);
                    let (vs, v_inv) = scale_of(vg);
                    s[k_scale + i * step] = ks;
                    s[v_scale + i * step] = vs;
                    for (j, &x) in kg.iter().enumerate() {
                        region[k_at + (i * g + j) * KV_TILE] = i8::from_f32(x * k_inv);
                    }
                    let row = &mut region[v_at + i * g..v_at + i * g + vg.len()];
                    for (d, &x) in row.iter_mut().zip(vg) {
                        *d = i8::from_f32(x * v_inv);
                    }
                }
            }
        }
    }

    /// K and V of one position of `layer`, as f32.
    pub fn read(&self, layer: usize, block: BlockId, slot: usize) -> (Vec<f32>, Vec<f32>) {
        let layout = self.layout;
        match &self.data {
            KvData::F32(r) => read_position(&r.layers[layer], layout, block, slot),
            KvData::Bf16(r) => read_position(&r.layers[layer], layout, block, slot),
            KvData::Int8(r, scales) => {
                let (mut k, mut v) = read_position(&r.layers[layer], layout, block, slot);
                let (k_scale, v_scale) = scales_at(layout, block, slot);
                let (g, step) = (layout.scale_group, layout.block_tokens);
                let s = &scales.layers[layer];
                for (i, (kg, vg)) in k.chunks_mut(g).zip(v.chunks_mut(g)).enumerate() {
                    kg.iter_mut().for_each(|x| *x *= s[k_scale + i * step]);
                    vg.iter_mut().for_each(|x| *x *= s[v_scale + i * step]);
                }
                (k, v)
            }
        }
    }
}

/// The scale that maps the largest magnitude of `x` to 127, and its inverse (both 0 for all
/// zeros, which then stay zeros).
fn scale_of(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    (amax / 127.0, inv)
}

/// Where the scales of position `slot` of `block` sit in a layer's scale region: group 0's K
/// scale and V scale (group `g` is `g * block_tokens` further).
fn scales_at(layout: KvLayout, block: BlockId, slot: usize) -> (usize, usize) {
    let base = block as usize * layout.layer_block_scales();
    let k = base + slot;
    (k, k + layout.groups() * layout.block_tokens)
}

/// Where position `slot` of `block` sits in a layer's region: its K (feature `i` at
/// `k + i * KV_TILE`) and its V row (`v..v + row`).
fn position_at(layout: KvLayout, block: BlockId, slot: usize) -> (usize, usize) {
    let (row, base) = (layout.row, block as usize * layout.layer_block_elems());
    let k = base + (slot / KV_TILE) * KV_TILE * row + slot % KV_TILE;
    let v = base + layout.block_tokens * row + slot * row;
    (k, v)
}

fn write_position<T: KvElem>(
    region: &mut [T],
    layout: KvLayout,
    block: BlockId,
    slot: usize,
    k: &[f32],
    v: &[f32],
) {
    let (k_at, v_at) = position_at(layout, block, slot);
    for (i, &x) in k.iter().enumerate() {
        region[k_at + i * KV_TILE] = T::from_f32(x);
    }
    for (d, &x) in region[v_at..v_at + layout.row].iter_mut().zip(v) {
        *d = T::from_f32(x);
    }
}

fn read_position<T: KvElem>(
    region: &[T],
    layout: KvLayout,
    block: BlockId,
    slot: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (k_at, v_at) = position_at(layout, block, slot);
    let k = (0..layout.row)
        .map(|i| region[k_at + i * KV_TILE].load())
        .collect();
    let v = region[v_at..v_at + layout.row]
        .iter()
        .map(|x| x.load())
        .collect();
    (k, v)
}

/// What attention reads of one sequence at one layer: its block table over the layer's region.
#[derive(Clone, Copy)]
pub(crate) struct LayerView<'a, T> {
    region: &'a [T],
    table: &'a [BlockId],
    row: usize,
    block_tokens: usize,
    block_elems: usize,
    /// The layer's scale region (empty unless int8), its scales a block, features a scale.
    scales: &'a [f32],
    block_scales: usize,
    scale_group: usize,
    groups: usize,
}

impl<'a, T: KvElem> LayerView<'a, T> {
    /// The view of `layer` through `table`; `scales` with int8 elements.
    pub fn new(
        regions: &'a Regions<T>,
        scales: Option<&'a Regions<f32>>,
        layout: KvLayout,
        layer: usize,
        table: &'a [BlockId],
    ) -> Self {
        debug_assert_eq!(T::SCALED, scales.is_some());
        Self {
            region: &regions.layers[layer],
            table,
            row: layout.row,
            block_tokens: layout.block_tokens,
            block_elems: layout.layer_block_elems(),
            scales: scales.map_or(&[][..], |s| &s.layers[layer][..]),
            block_scales: layout.layer_block_scales(),
            scale_group: layout.scale_group,
            groups: layout.groups(),
        }
    }

    /// The scales of K tile `t` (16 positions) for the group of feature `head_offset`.
    #[inline(always)]
    pub fn k_scales(&self, t: usize, head_offset: usize) -> &'a [f32] {
        let pos = t * KV_TILE;
        let b = pos / self.block_tokens;
        let start = self.table[b] as usize * self.block_scales
            + (head_offset / self.scale_group) * self.block_tokens
            + (pos - b * self.block_tokens);
        &self.scales[start..start + KV_TILE]
    }

    /// The V scales of block `b`'s positions for the group of feature `head_offset`.
    #[inline(always)]
    pub fn v_scales(&self, b: usize, head_offset: usize) -> &'a [f32] {
        let start = self.table[b] as usize * self.block_scales
            + (self.groups + head_offset / self.scale_group) * self.block_tokens;
        &self.scales[start..start + self.block_tokens]
    }

    fn block_base(&self, b: usize) -> usize {
        self.table[b] as usize * self.block_elems
    }

    /// K tile `t` (positions `16t..16t + 16`) of a KV head: `[head_dim][16]`, from feature
    /// `head_offset`.
    #[inline(always)]
    pub fn k_tile(&self, t: usize, head_offset: usize, head_dim: usize) -> &'a [T] {
        let pos = t * KV_TILE;
        let b = pos / self.block_tokens;
        let start =
            self.block_base(b) + (pos - b * self.block_tokens) * self.row + head_offset * KV_TILE;
        &self.region[start..start + head_dim * KV_TILE]
    }

    /// V rows of block `b` (`[block_tokens][row]`), and the block's first position.
    #[inline(always)]
    pub fn v_block(&self, b: usize) -> &'a [T] {
        let start = self.block_base(b) + self.block_tokens * self.row;
        &self.region[start..start + self.block_tokens * self.row]
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn row(&self) -> usize {
        self.row
    }

    /// Asks the CPU to bring the first `positions` positions' K and V into its caches
    /// (`prefetcht1`: L2), so attention does not wait on memory line by line.
    pub fn prefetch(&self, positions: usize) {
        #[cfg(target_arch = "x86_64")]
        for b in 0..positions.div_ceil(self.block_tokens).min(self.table.len()) {
            let start = self.block_base(b);
            prefetch_lines(&self.region[start..start + self.block_elems]);
            // Int8: the block's scales too (a stream of their own).
            let start = self.table[b] as usize * self.block_scales;
            prefetch_lines(&self.scales[start..start + self.block_scales]);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = positions;
    }
}

/// Asks the CPU to bring `data` into L2 (`prefetcht1`), a cache line at a time.
#[cfg(target_arch = "x86_64")]
fn prefetch_lines<T>(data: &[T]) {
    for line in data.chunks((64 / std::mem::size_of::<T>()).max(1)) {
        // SAFETY: prefetching is a hint and never faults; the address is in the slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr() as *const i8
            )
        };
    }
}
