//! TEMPORARY plain-op versions of the Llama kernels, replaced by the fused ones at merge.
#![allow(missing_docs, dead_code)]
use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(&weight.to_dtype(DType::F32)?)?.to_dtype(dt)?)
}

#[derive(Debug, Clone)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub head_dim: usize,
    pub max_positions: usize,
}

impl RopeTable {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64) -> Result<Self> {
        let h = head_dim / 2;
        let inv: Vec<f32> = (0..h)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(max_positions * h);
        let mut sin = Vec::with_capacity(max_positions * h);
        for p in 0..max_positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self { cos, sin, head_dim, max_positions })
    }
}

fn rope_heads(x: &Tensor, table: &RopeTable, past: usize) -> Result<Tensor> {
    // x: (B, T, n, hs)
    let (_b, t, _n, hs) = x.dims4()?;
    let h = hs / 2;
    let dev = x.device();
    let cos = Tensor::from_slice(&table.cos[past * h..(past + t) * h], (t, h), dev)?;
    let sin = Tensor::from_slice(&table.sin[past * h..(past + t) * h], (t, h), dev)?;
    let cos = Tensor::cat(&[&cos, &cos], 1)?.reshape((1, t, 1, hs))?;
    let sin = Tensor::cat(&[&sin, &sin], 1)?.reshape((1, t, 1, hs))?;
    let x1 = x.narrow(3, 0, h)?;
    let x2 = x.narrow(3, h, h)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
}

pub fn rope_qkv(qkv: &Tensor, table: &RopeTable, n_head: usize, n_kv_head: usize, past: usize) -> Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    let hs = w / (n_head + 2 * n_kv_head);
    if past + t > table.max_positions {
        return Err(Error::InvalidArgument("rope past table".into()));
    }
    let q = qkv.narrow(2, 0, n_head * hs)?.reshape((b, t, n_head, hs))?;
    let k = qkv.narrow(2, n_head * hs, n_kv_head * hs)?.reshape((b, t, n_kv_head, hs))?;
    let v = qkv.narrow(2, (n_head + n_kv_head) * hs, n_kv_head * hs)?;
    let q = rope_heads(&q, table, past)?.reshape((b, t, n_head * hs))?;
    let k = rope_heads(&k, table, past)?.reshape((b, t, n_kv_head * hs))?;
    Ok(Tensor::cat(&[&q, &k, &v], 2)?)
}

pub(crate) fn rope_rows(x: &mut [f32], n_heads: usize, hs: usize, pos: usize, table: &RopeTable) {
    let h = hs / 2;
    let (cos, sin) = (&table.cos[pos * h..(pos + 1) * h], &table.sin[pos * h..(pos + 1) * h]);
    for head in x.chunks_exact_mut(hs).take(n_heads) {
        for i in 0..h {
            let (a, b) = (head[i], head[i + h]);
            head[i] = a * cos[i] - b * sin[i];
            head[i + h] = b * cos[i] + a * sin[i];
        }
    }
}

pub fn swiglu(h: &Tensor) -> Result<Tensor> {
    let i = h.dim(D::Minus1)? / 2;
    let g = h.narrow(D::Minus1, 0, i)?;
    let u = h.narrow(D::Minus1, i, i)?;
    let s = (g.neg()?.exp()? + 1.0)?.recip()?;
    Ok((g.mul(&s)?).mul(&u)?)
}

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
