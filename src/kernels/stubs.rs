//! TEMPORARY plain-op versions of the Llama kernels, replaced by the fused ones at merge.
#![allow(missing_docs, dead_code)]
use candle_core::Tensor;

use crate::Result;

pub(crate) fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, t, hs) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, nkv, n_rep, t, hs))?.reshape((b, nkv * n_rep, t, hs))?)
}

pub fn causal_attention_gqa_qkv(qkv: &Tensor, n_head: usize, n_kv_head: usize, scale: f64) -> Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    let hs = w / (n_head + 2 * n_kv_head);
    let split = |off: usize, n: usize| -> Result<Tensor> {
        Ok(qkv.narrow(2, off * hs, n * hs)?.reshape((b, t, n, hs))?.transpose(1, 2)?.contiguous()?)
    };
    let q = split(0, n_head)?;
    let k = repeat_kv(&split(n_head, n_kv_head)?, n_head / n_kv_head)?;
    let v = repeat_kv(&split(n_head + n_kv_head, n_kv_head)?, n_head / n_kv_head)?;
    let y = crate::attention::causal_attention(&q, &k, &v, scale)?;
    Ok(y.transpose(1, 2)?.reshape((b, t, n_head * hs))?)
}

pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let rep = q.dim(1)? / k.dim(1)?;
    crate::attention::causal_attention(&q.contiguous()?, &repeat_kv(&k.contiguous()?, rep)?.contiguous()?, &repeat_kv(&v.contiguous()?, rep)?.contiguous()?, scale)
}

/// decode_rows with GQA: q (R, nh*hs); caches k/v (nkv, cap, hs).
pub(crate) fn decode_rows(q: &[f32], caches: &[crate::attention::RowCache], dims: (usize, usize, usize, usize), scale: f32) -> Result<Vec<f32>> {
    let (nh, nkv, hs, cap) = dims;
    let g = nh / nkv;
    let mut out = vec![0f32; q.len()];
    for (r, c) in caches.iter().enumerate() {
        for h in 0..nh {
            let kvh = h / g;
            let qh = &q[(r * nh + h) * hs..(r * nh + h + 1) * hs];
            let mut s: Vec<f32> = (0..c.len).map(|j| {
                let k = &c.k[(kvh * cap + j) * hs..(kvh * cap + j + 1) * hs];
                qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            }).collect();
            let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0.0;
            for x in s.iter_mut() { *x = (*x - m).exp(); z += *x; }
            let o = &mut out[(r * nh + h) * hs..(r * nh + h + 1) * hs];
            for (j, p) in s.iter().enumerate() {
                let v = &c.v[(kvh * cap + j) * hs..(kvh * cap + j + 1) * hs];
                for (o, v) in o.iter_mut().zip(v) { *o += p / z * v; }
            }
        }
    }
    Ok(out)
}
