//! Batched decoding: many sequences, each at its own position, one forward pass per step.
//!
//! A server answers several requests at once. Decoding is memory-bound: one token costs a read
//! of every weight, so feeding one token of each of `R` sequences through the model in one
//! pass costs barely more than one token alone, and gives `R` tokens. The sequences have
//! different lengths, so they cannot share one [`KvCache`]: each sits in a **slot** of
//! [`DecodeSlots`], with its own keys, values and length, as llama.cpp's server slots and
//! vLLM's sequences do.
//!
//! * [`Gpt::prefill_slot`] runs a prompt through the model into a slot (positions `0..T`) and
//!   returns the logits after its last token;
//! * [`Gpt::decode_step`] feeds one token per listed slot, each at its slot's next position,
//!   attending only to its own slot's cache, and returns one row of logits per slot.
//!
//! Every operation of a step is row-wise (LayerNorm, the projections, the per-slot attention,
//! the head). With f16 or f32 weights on the CPU the projections are tinygpt's streaming
//! kernels ([`Gpt::to_dtype`] picks the dtype), which sum each row in the same order whatever
//! the batch, so a row's logits are bit for bit those of decoding it alone, and so are its
//! tokens.
//!
//! ```
//! use tinygpt::candle::Device;
//! use tinygpt::decode::DecodeSlots;
//! use tinygpt::{Gpt, GptConfig};
//!
//! let cfg = GptConfig { vocab_size: 11, block_size: 16, n_layer: 2, n_head: 2, n_embd: 8,
//!                       dropout: 0.0, bias: true, ..Default::default() };
//! let model = Gpt::init(&cfg, 1, &Device::Cpu)?;
//! let mut slots = DecodeSlots::new(&model, 2)?;
//! let a = model.prefill_slot(&mut slots, 0, &[1, 2, 3])?; // (V,) after the prompt
//! let b = model.prefill_slot(&mut slots, 1, &[4])?;
//! assert_eq!((a.len(), b.len()), (11, 11));
//! // One step: slot 0 at position 3, slot 1 at position 1.
//! let logits = model.decode_step(&mut slots, &[(0, 5), (1, 6)])?; // (2, V)
//! assert_eq!(logits.len(), 2);
//! assert_eq!((slots.len(0), slots.len(1)), (4, 2));
//! # Ok::<(), tinygpt::Error>(())
//! ```

use candle_core::{DType, Tensor};

use crate::model::{Gpt, KvCache};
use crate::{Error, Result};

/// The KV caches of up to `n_slots` sequences decoded together. Each slot holds its own
/// keys and values for up to `block_size` positions; its buffers are allocated on first use
/// and kept (freeing a slot only forgets its length).
///
/// On the CPU a slot's keys and values are plain f32 buffers that a step reads and writes in
/// place (one attention call per layer for all rows); elsewhere (CUDA) each slot is a
/// [`KvCache`] and a step runs the rows one after another.
#[derive(Debug)]
pub struct DecodeSlots {
    slots: Vec<Slot>,
    /// Where a prompt is prefilled before its keys and values move to a CPU slot.
    prefill: KvCache,
    n_layer: usize,
    /// Floats per layer of a slot: `block_size · n_kv_head · head_size` (`block_size ·
    /// n_embd` for multi-head attention).
    layer_len: usize,
    cpu: bool,
}

/// Floats of one layer's keys (or values) for a whole context: `block_size · n_kv_head ·
/// head_size`, saturating.
fn kv_floats(cfg: &crate::GptConfig) -> usize {
    cfg.block_size
        .saturating_mul(cfg.n_kv_heads())
        .saturating_mul(cfg.head_size())
}

#[derive(Debug, Default)]
struct Slot {
    len: usize,
    /// CPU: per layer `(n_kv_head, block_size, hs)` keys and values (empty until first used).
    kv: SlotKv,
    /// Other devices: the slot's cache.
    cache: Option<KvCache>,
}

/// One slot's keys and values on the CPU: per layer, `(n_kv_head, block_size, hs)` f32.
#[derive(Debug, Default)]
pub(crate) struct SlotKv {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
}

impl SlotKv {
    /// Buffers for `n_layer` layers of `layer_len` floats each, every page written once.
    fn allocated(n_layer: usize, layer_len: usize) -> Self {
        let buffer = || {
            let mut v = vec![0f32; layer_len];
            // `vec![0; n]` maps pages lazily: write one float per 4 KiB page, so the page
            // faults happen here and not during a decoding step.
            for x in v.iter_mut().step_by(1024) {
                // SAFETY: `x` is a valid, aligned, exclusive reference into `v`.
                unsafe { std::ptr::write_volatile(x, 0.0) };
            }
            v
        };
        Self {
            k: (0..n_layer).map(|_| buffer()).collect(),
            v: (0..n_layer).map(|_| buffer()).collect(),
        }
    }
}

impl DecodeSlots {
    /// `n_slots` empty slots for `model`. Nothing is allocated until a slot is used; each
    /// used slot then holds `2 · n_layer · block_size · n_kv_head · head_size` floats
    /// (`n_embd` per position for multi-head attention: 75 MB for GPT-2 124M).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `n_slots` is 0.
    pub fn new(model: &Gpt, n_slots: usize) -> Result<Self> {
        if n_slots == 0 {
            return Err(Error::InvalidArgument(
                "a batch needs at least one decode slot".into(),
            ));
        }
        let cfg = model.config();
        Ok(Self {
            slots: (0..n_slots).map(|_| Slot::default()).collect(),
            prefill: KvCache::new(cfg.n_layer),
            n_layer: cfg.n_layer,
            layer_len: kv_floats(cfg),
            cpu: model.device().is_cpu(),
        })
    }

    /// Allocates every slot's buffers now and touches their pages, so that no later step
    /// waits on the operating system for fresh memory (a first use of a GPT-2 124M slot
    /// otherwise page-faults 75 MB in the middle of decoding). A server calls this once at
    /// start, as llama.cpp's server allocates its slots' KV cache. Nothing to do off the CPU
    /// (those caches are allocated on first use).
    pub fn allocate_all(&mut self) {
        if !self.cpu {
            return;
        }
        let (n_layer, layer_len) = (self.n_layer, self.layer_len);
        for slot in &mut self.slots {
            if slot.kv.k.len() != n_layer {
                slot.kv = SlotKv::allocated(n_layer, layer_len);
            }
        }
    }

    /// Bytes `n_slots` slots' keys and values take for `model` once allocated on the CPU
    /// (`n_slots · 2 · n_layer · block_size · n_kv_head · head_size` f32s, saturating); 0 on other devices.
    pub fn bytes_needed(model: &Gpt, n_slots: usize) -> usize {
        if !model.device().is_cpu() {
            return 0;
        }
        let cfg = model.config();
        n_slots
            .saturating_mul(2 * cfg.n_layer)
            .saturating_mul(kv_floats(cfg))
            .saturating_mul(std::mem::size_of::<f32>())
    }

    /// Number of slots.
    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    /// Positions cached in `slot` (the position its next token takes); 0 for a slot out of
    /// range.
    pub fn len(&self, slot: usize) -> usize {
        self.slots.get(slot).map(|s| s.len).unwrap_or(0)
    }

    /// Whether `slot` holds no positions.
    pub fn is_empty(&self, slot: usize) -> bool {
        self.len(slot) == 0
    }

    /// Forgets what `slot` holds (its buffers are kept for the next sequence).
    pub fn free(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.len = 0;
            if let Some(c) = s.cache.as_mut() {
                c.reset();
            }
        }
    }

    fn slot_mut(&mut self, slot: usize) -> Result<&mut Slot> {
        let n = self.slots.len();
        self.slots.get_mut(slot).ok_or_else(|| {
            Error::InvalidArgument(format!("decode slot {slot} does not exist (there are {n})"))
        })
    }
}

impl Gpt {
    /// Runs `prompt_ids` through the model into `slot`, at positions `0..T` (whatever the slot
    /// held before is forgotten), and returns the logits after the last prompt token, (V,) f32.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a slot out of range, an empty prompt, an id outside the
    /// vocabulary or a prompt longer than `block_size`; candle errors.
    pub fn prefill_slot(
        &self,
        slots: &mut DecodeSlots,
        slot: usize,
        prompt_ids: &[u32],
    ) -> Result<Vec<f32>> {
        self.check_slots(slots)?;
        self.check_ids(prompt_ids)?;
        let t = prompt_ids.len();
        let input = Tensor::from_slice(prompt_ids, (1, t), self.device())?; // (1, T)
        let (n_layer, layer_len, cpu) = (slots.n_layer, slots.layer_len, slots.cpu);
        slots.slot_mut(slot)?.len = 0;
        let logits = if cpu {
            // Prefill through the whole-sequence path, then move the keys and values into the
            // slot's buffers: (1, nkv, capacity, hs) → (nkv, block_size, hs), first T positions.
            let cache = &mut slots.prefill;
            cache.reset();
            let logits = self.forward_with_cache(&input, cache)?; // (1, V)
            let (nkv, hs, cap) = self.head_dims();
            let mut kv = std::mem::take(&mut slots.slot_mut(slot)?.kv);
            if kv.k.len() != n_layer {
                kv = SlotKv::allocated(n_layer, layer_len);
            }
            for (l, layer) in slots.prefill.layers.iter().enumerate() {
                let Some(layer) = layer else {
                    return Err(Error::InvalidArgument(format!(
                        "prefill left layer {l} uncached"
                    )));
                };
                for (src, dst) in [(&layer.k, &mut kv.k[l]), (&layer.v, &mut kv.v[l])] {
                    let src = src.narrow(2, 0, t)?.to_dtype(DType::F32)?.flatten_all()?;
                    let src = src.to_vec1::<f32>()?; // (nkv, T, hs)
                    for h in 0..nkv {
                        dst[h * cap * hs..(h * cap + t) * hs]
                            .copy_from_slice(&src[h * t * hs..(h + 1) * t * hs]);
                    }
                }
            }
            slots.slot_mut(slot)?.kv = kv;
            logits
        } else {
            let s = slots.slot_mut(slot)?;
            let cache = s.cache.get_or_insert_with(|| KvCache::new(n_layer));
            cache.reset();
            self.forward_with_cache(&input, cache)? // (1, V)
        };
        slots.slot_mut(slot)?.len = t;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// One decoding step for several slots: `rows[r] = (slot, token)` feeds `token` at the
    /// slot's next position (`slots.len(slot)`), and row `r` of the result holds the logits
    /// after it, (R, V) f32 as one `Vec` per row. Each slot appears at most once.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a slot out of range or listed twice, an empty slot (it
    /// needs [`Gpt::prefill_slot`] first), a full slot (`block_size` positions), or a token
    /// outside the vocabulary; candle errors.
    pub fn decode_step(
        &self,
        slots: &mut DecodeSlots,
        rows: &[(usize, u32)],
    ) -> Result<Vec<Vec<f32>>> {
        self.check_slots(slots)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let tokens: Vec<u32> = rows.iter().map(|&(_, t)| t).collect();
        self.check_ids(&tokens)?;
        let block_size = self.config().block_size;
        let mut pos = Vec::with_capacity(rows.len());
        for (i, &(slot, _)) in rows.iter().enumerate() {
            if rows[..i].iter().any(|&(s, _)| s == slot) {
                return Err(Error::InvalidArgument(format!(
                    "decode slot {slot} is listed twice in one step"
                )));
            }
            let len = slots.slot_mut(slot)?.len;
            if len == 0 {
                return Err(Error::InvalidArgument(format!(
                    "decode slot {slot} is empty: prefill it with a prompt first"
                )));
            }
            if len >= block_size {
                return Err(Error::InvalidArgument(format!(
                    "decode slot {slot} is full: {len} positions fill block_size {block_size}"
                )));
            }
            pos.push(len);
        }
        let logits = if slots.cpu {
            // Every row's buffers, in the order of `rows` (each slot listed once, checked).
            let mut by_slot: Vec<Option<&mut SlotKv>> =
                slots.slots.iter_mut().map(|s| Some(&mut s.kv)).collect();
            let mut kv = Vec::with_capacity(rows.len());
            for &(slot, _) in rows {
                match by_slot.get_mut(slot).and_then(Option::take) {
                    Some(s) if s.k.len() == slots.n_layer => kv.push(s),
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "decode slot {slot} has no buffers: prefill it first"
                        )))
                    }
                }
            }
            let logits = self.decode_rows(&tokens, &pos, &mut kv)?; // (R, V)
            logits.to_dtype(DType::F32)?.to_vec2::<f32>()?
        } else {
            let device = self.device().clone();
            let mut out = Vec::with_capacity(rows.len());
            for &(slot, token) in rows {
                let n_layer = slots.n_layer;
                let s = slots.slot_mut(slot)?;
                let cache = s.cache.get_or_insert_with(|| KvCache::new(n_layer));
                let input = Tensor::from_slice(&[token], (1, 1), &device)?; // (1, 1)
                let logits = self.forward_with_cache(&input, cache)?; // (1, V)
                out.push(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            out
        };
        for &(slot, _) in rows {
            slots.slot_mut(slot)?.len += 1;
        }
        Ok(logits)
    }

    /// `(nkv, hs, block_size)`: the key/value heads a slot holds.
    fn head_dims(&self) -> (usize, usize, usize) {
        let cfg = self.config();
        (cfg.n_kv_heads(), cfg.head_size(), cfg.block_size)
    }

    fn check_slots(&self, slots: &DecodeSlots) -> Result<()> {
        let cfg = self.config();
        if slots.n_layer != cfg.n_layer || slots.layer_len != kv_floats(cfg) {
            return Err(Error::InvalidArgument(format!(
                "these decode slots were made for another model shape ({} layers of {} floats), \
                 this one has {} layers of {}",
                slots.n_layer,
                slots.layer_len,
                cfg.n_layer,
                kv_floats(cfg)
            )));
        }
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let (vocab, block_size) = (self.config().vocab_size, self.config().block_size);
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no tokens to feed".into()));
        }
        if ids.len() > block_size {
            return Err(Error::InvalidArgument(format!(
                "a prompt of {} tokens does not fit block_size {block_size}",
                ids.len()
            )));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {id} is outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptConfig;
    use candle_core::Device;

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn model(dtype: DType) -> Gpt {
        let cfg = GptConfig {
            vocab_size: 37,
            block_size: 24,
            n_layer: 2,
            n_head: 3,
            n_embd: 24,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let m = Gpt::init(&cfg, 7, &Device::Cpu).unwrap();
        if dtype == DType::F32 {
            m
        } else {
            m.to_dtype(dtype).unwrap()
        }
    }

    /// Logits of the last position, recomputed from scratch over the whole sequence.
    fn full(m: &Gpt, ids: &[u32]) -> Vec<f32> {
        let x = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
        let logits = m.forward(&x).unwrap().to_dtype(DType::F32).unwrap(); // (1, T, V)
        logits
            .squeeze(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn rows_of_different_lengths_match_whole_sequence_recomputation() {
        let m = model(DType::F32);
        let mut slots = DecodeSlots::new(&m, 4).unwrap();
        // Three sequences of lengths 1, 5 and 11, in slots 3, 0 and 2 (slot 1 stays empty).
        let mut seqs: Vec<(usize, Vec<u32>)> = vec![
            (3, vec![4]),
            (0, vec![1, 2, 3, 4, 5]),
            (2, (0..11).map(|i| (i * 7 % 37) as u32).collect()),
        ];
        for (slot, ids) in &seqs {
            let got = m.prefill_slot(&mut slots, *slot, ids).unwrap();
            assert!(max_abs_diff(&got, &full(&m, ids)) < 1e-5);
        }
        for step in 0..8u32 {
            let rows: Vec<(usize, u32)> = seqs
                .iter()
                .enumerate()
                .map(|(i, (slot, _))| (*slot, (step * 5 + i as u32) % 37))
                .collect();
            let logits = m.decode_step(&mut slots, &rows).unwrap();
            for ((slot, ids), (row, &(_, t))) in seqs.iter_mut().zip(logits.iter().zip(&rows)) {
                ids.push(t);
                assert_eq!(slots.len(*slot), ids.len());
                let d = max_abs_diff(row, &full(&m, ids));
                assert!(d < 1e-5, "slot {slot} step {step}: {d}");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        // f16 at two widths: 24 (every product on one thread) and 96 (one row's c_attn product
        // is below the threshold for splitting over threads, four rows' is above it), and f32
        // at width 24.
        let wide = GptConfig {
            vocab_size: 37,
            block_size: 24,
            n_layer: 2,
            n_head: 4,
            n_embd: 96,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let wide = Gpt::init(&wide, 5, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        // And a Llama-style model in f16 (grouped-query attention, SwiGLU, `(out, in)` weights:
        // one row's products take four weight rows at a time, a batch's one at a time).
        let llama = GptConfig {
            n_kv_head: Some(2),
            intermediate_size: Some(160),
            ..GptConfig::llama(37, 24, 2, 4, 96)
        };
        let llama = Gpt::init(&llama, 6, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        for (name, m) in [
            ("f32", model(DType::F32)),
            ("f16", model(DType::F16)),
            ("f16 wide", wide),
            ("f16 llama", llama),
        ] {
            let prompt = [3u32, 1, 4, 1, 5];
            // Alone.
            let mut alone = DecodeSlots::new(&m, 1).unwrap();
            m.prefill_slot(&mut alone, 0, &prompt).unwrap();
            let mut solo = Vec::new();
            for t in [9u32, 2, 6, 5] {
                solo.push(m.decode_step(&mut alone, &[(0, t)]).unwrap().remove(0));
            }
            // The same sequence in slot 2 of a batch of four, beside others.
            let mut batch = DecodeSlots::new(&m, 4).unwrap();
            for (slot, p) in [(0usize, vec![7u32; 9]), (1, vec![2]), (3, vec![8, 8, 1])] {
                m.prefill_slot(&mut batch, slot, &p).unwrap();
            }
            m.prefill_slot(&mut batch, 2, &prompt).unwrap();
            for (i, t) in [9u32, 2, 6, 5].into_iter().enumerate() {
                let rows = [(0, 1), (2, t), (1, 3), (3, 4)];
                let got = m.decode_step(&mut batch, &rows).unwrap();
                assert_eq!(got[1], solo[i], "{name} step {i}");
            }
        }
    }

    #[test]
    fn bad_steps_are_refused() {
        let m = model(DType::F32);
        let mut slots = DecodeSlots::new(&m, 2).unwrap();
        let e = m
            .decode_step(&mut slots, &[(0, 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("slot 0 is empty"), "{e}");
        m.prefill_slot(&mut slots, 0, &[1]).unwrap();
        let e = m
            .decode_step(&mut slots, &[(0, 1), (0, 2)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = m
            .decode_step(&mut slots, &[(5, 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("slot 5 does not exist"), "{e}");
        let e = m
            .decode_step(&mut slots, &[(0, 99)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside"), "{e}");
        let e = m
            .prefill_slot(&mut slots, 1, &[1; 25])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
        m.prefill_slot(&mut slots, 1, &[1; 24]).unwrap();
        let e = m
            .decode_step(&mut slots, &[(1, 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is full"), "{e}");
        assert!(DecodeSlots::new(&m, 0).is_err());
    }
}
