//! `adamw` (kernels/adamw.cu): decoupled weight decay and Adam on the f32 master weights, writing the fp16
//! operand copy in the same pass.

use super::Args;
use crate::backend::cuda::args::launch::AdamwF32;
use crate::backend::cuda::args::DevOut;
use crate::backend::cuda::buf::Data;
use crate::backend::cuda::{cfg, drv, geometry, CudaBackend, CudaBuf, Work};
use crate::ops::Checked;
use anyhow::Result;

pub fn run(be: &CudaBackend, a: Checked<Args<'_, CudaBuf>>) -> Result<()> {
    let Args { layer, len, p, grad, m, v, copy } = a.into_inner();
    be.enter_layer(layer)?;
    let _timer = be.time_op("adamw");
    // The scalars from the step's parameters (the current lane's slot, which Schedule::prepare_step filled).
    let params = be.step_params.lock().unwrap();
    let hp = be.adamw_slot(&params, be.lane_index())?;
    let ps = p.f32_mut("parameter")?;
    // The fp16 copy is written by the kernel; an f32 copy (an f32 backend's operand) is a device copy after it.
    let (f16_copy, f32_copy) = match copy.map(|c| c.data_mut()) {
        Some(Data::F16(c)) => (Some(c as &mut dyn DevOut<half::f16>), None),
        Some(Data::F32(c)) => (None, Some(c)),
        None => (None, None),
    };
    // SAFETY: the op's checks (crate::ops::adamw) bound every buffer to len; the copy is an fp16 buffer of >= len or null.
    // p, m and v read and written, g read (f32), and the fp16 copy written.
    let work = Work::bytes((4 * 7 + 2 * f16_copy.is_some() as usize) as f64 * len as f64);
    be.launch("adamw_f32", work, || {
        Ok(unsafe {
            AdamwF32 {
                p: &mut *ps,
                g: grad.f32("gradient")?,
                m: m.f32_mut("exp_avg")?,
                v: v.f32_mut("exp_avg_sq")?,
                copy: f16_copy,
                n: len as i32,
                hp: &hp,
            }
            .launch(be.stream(), be.f("adamw_f32")?, cfg(geometry::adamw(len)))
        })
    })?;
    if let Some(c) = f32_copy {
        drv(be.stream().memcpy_dtod(&ps.slice(0..len), &mut c.slice_mut(0..len)), "copy weights")?;
    }
    Ok(())
}
