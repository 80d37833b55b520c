//! The CUDA backend as a [`Device`]: its buffers (f32 or the operand precision), uploads, reads (a channels-last
//! activation comes back in NCHW order), fills, the pinned staging of a batch's input and the labels. Memory
//! operations run on the first lane (`CudaBackend::memory_stream`), ordered with the others by cudarc's events.

use super::{buf::Data, drv, fits, geometry, pinned, CudaBackend, CudaBuf};
use crate::backend::{Device, Precision};
use anyhow::Result;
use cudarc::driver::CudaSlice;

impl Device for CudaBackend {
    type Buf = CudaBuf;

    type Labels = CudaSlice<u32>;

    fn name(&self) -> String {
        format!("{} {}", self.name, self.precision.as_str())
    }

    fn kind(&self) -> &'static str {
        "cuda"
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn buffers_on_host(&self) -> bool {
        false
    }

    fn synchronize(&self) -> Result<()> {
        for s in self.streams.iter().chain(&self.copy_stream).chain([&self.rb_stream]) {
            drv(s.synchronize(), "synchronize")?;
        }
        Ok(())
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.alloc_f32(len).map(CudaBuf::from)
    }

    fn uninit(&self, len: usize) -> Result<CudaBuf> {
        // SAFETY: the trainer asks for uninitialised buffers only where a kernel writes before any read (the
        // stand-in fills them with NaN, so a read of what nobody wrote shows).
        drv(unsafe { self.memory_stream().alloc::<f32>(len.max(1)) }, "alloc").map(CudaBuf::from)
    }

    fn operand_zeros(&self, len: usize) -> Result<CudaBuf> {
        match self.precision {
            Precision::F32 => self.zeros(len),
            Precision::F16 => {
                drv(self.memory_stream().alloc_zeros::<half::f16>(len.max(1)), "alloc").map(CudaBuf::from)
            }
        }
    }

    fn operand_uninit(&self, len: usize) -> Result<CudaBuf> {
        match self.precision {
            Precision::F32 => self.uninit(len),
            // SAFETY: as for uninit.
            Precision::F16 => {
                drv(unsafe { self.memory_stream().alloc::<half::f16>(len.max(1)) }, "alloc").map(CudaBuf::from)
            }
        }
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        let mut b = self.uninit(data.len())?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn write(&self, dst: &mut CudaBuf, data: &[f32]) -> Result<()> {
        fits("destination", dst.len(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        match dst.data_mut() {
            Data::F32(d) => {
                drv(self.memory_stream().memcpy_htod(data, &mut d.slice_mut(0..data.len())), "copy to device")
            }
            Data::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                let mut h = vec![half::f16::ZERO; data.len()];
                h.convert_from_f32_slice(data);
                drv(self.memory_stream().memcpy_htod(&h, &mut d.slice_mut(0..data.len())), "copy to device")
            }
        }
    }

    fn read(&self, src: &CudaBuf, len: usize) -> Result<Vec<f32>> {
        fits("source", src.len(), len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mark = src.channels_last();
        if let Some([b, c, h, w]) = mark {
            anyhow::ensure!(
                len <= b * c * h * w && len.is_multiple_of(c * h * w),
                "cuda backend: a read of {len} values of a channels-last [{b}, {c}, {h}, {w}] tensor (whole samples \
                 only)"
            );
        }
        let host = match src.data() {
            Data::F32(s) => drv(self.memory_stream().clone_dtoh(&s.slice(0..len)), "copy to host")?,
            Data::F16(s) => {
                use half::slice::HalfFloatSliceExt;
                drv(self.memory_stream().clone_dtoh(&s.slice(0..len)), "copy to host")?.to_f32_vec()
            }
        };
        // A channels-last activation comes back in its logical NCHW order.
        Ok(match mark {
            Some([_, c, h, w]) => geometry::nchw_from_nhwc(&host, c, h * w),
            None => host,
        })
    }

    fn fill_zero(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        fits("buffer", buf.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let done = match buf.data_mut() {
            Data::F32(d) => self.memory_stream().memset_zeros(&mut d.slice_mut(0..len)),
            Data::F16(d) => self.memory_stream().memset_zeros(&mut d.slice_mut(0..len)),
        };
        drv(done, "memset")
    }

    fn write_input(&self, dst: &mut CudaBuf, data: &[f32]) -> Result<()> {
        fits("destination", dst.len(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.staging.lock().unwrap();
        let st = &mut *st;
        let i = st.next;
        st.next ^= 1;
        let n = data.len();
        let stream = self.copy_stream.as_ref().unwrap_or(self.memory_stream());
        // This staging buffer's previous copy (two batches ago) must have run before the host refills it.
        if let Some(e) = &st.copied[i] {
            drv(e.synchronize(), "staging buffer")?;
        }
        match dst.data_mut() {
            Data::F32(d) => {
                let p = pinned(&self.ctx, &mut st.f32[i], n, false)?;
                drv(p.as_mut_slice(), "pinned buffer")?.copy_from_slice(data);
                drv(stream.memcpy_htod(&*p, &mut d.slice_mut(0..n)), "copy input to device")?;
            }
            Data::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                let p = pinned(&self.ctx, &mut st.f16[i], n, false)?;
                drv(p.as_mut_slice(), "pinned buffer")?.convert_from_f32_slice(data);
                drv(stream.memcpy_htod(&*p, &mut d.slice_mut(0..n)), "copy input to device")?;
            }
        }
        if st.copied[i].is_none() {
            st.copied[i] = Some(drv(self.ctx.new_event(None), "event")?);
        }
        drv(st.copied[i].as_ref().expect("just made").record(stream), "event")
    }

    fn labels(&self, labels: &[u32]) -> Result<CudaSlice<u32>> {
        // SAFETY: written below before any kernel reads it (an empty label buffer is never read).
        let mut b = drv(unsafe { self.memory_stream().alloc::<u32>(labels.len().max(1)) }, "alloc")?;
        if !labels.is_empty() {
            drv(self.memory_stream().memcpy_htod(labels, &mut b.slice_mut(0..labels.len())), "copy labels")?;
        }
        Ok(b)
    }

    fn write_labels(&self, dst: &mut CudaSlice<u32>, labels: &[u32]) -> Result<()> {
        if dst.len() < labels.len() {
            *dst = self.labels(labels)?;
        } else if !labels.is_empty() {
            drv(self.memory_stream().memcpy_htod(labels, &mut dst.slice_mut(0..labels.len())), "copy labels")?;
        }
        Ok(())
    }
}
