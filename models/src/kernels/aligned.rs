//! Buffers whose first element starts a cache line.
//!
//! Why: a 64-byte vector load that straddles two cache lines costs two loads. Safetensors
//! places tensor data at whatever offset its header length leaves (SmolLM2's tensors all start
//! 40 bytes into a line), and the allocator hands out 16-byte-aligned vectors, so every load
//! of a weight row and of an activation row straddled: the f32 prompt tile measured about 35 %
//! slower that way than on line-aligned operands (rows of whole lines, this machine). So every
//! kernel input is line-aligned, and f32 weights that do not start on a line are copied to one
//! at load (16-bit weights stay in the mapping: [`crate::precision::in_place`]). Kept in
//! safe code: the vector is over-allocated by one line and the view starts at the first
//! boundary inside it (the vector never reallocates, so the boundary stays put).

use std::ops::{Deref, DerefMut};

/// Bytes in a cache line (and in one AVX-512 vector).
pub const LINE: usize = 64;

/// Whether `bytes` starts on a cache line.
pub fn is_line_aligned<T>(bytes: &[T]) -> bool {
    (bytes.as_ptr() as usize).is_multiple_of(LINE)
}

/// `len` values of `T` starting on a cache line.
pub struct Aligned<T: bytemuck::Pod> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: bytemuck::Pod> Aligned<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let size = std::mem::size_of::<T>();
        assert!(
            size > 0 && LINE.is_multiple_of(size),
            "element size divides a line"
        );
        let buf = vec![T::zeroed(); len + LINE / size];
        let addr = buf.as_ptr() as usize;
        // The vector is aligned for `T`, so the gap to the next line is whole elements.
        let start = (addr.next_multiple_of(LINE) - addr) / size;
        Aligned { buf, start, len }
    }

    /// A line-aligned copy of `values`.
    pub fn copy_of(values: &[T]) -> Self {
        let mut a = Self::zeroed(values.len());
        a.copy_from_slice(values);
        a
    }
}

impl<T: bytemuck::Pod> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T: bytemuck::Pod> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl<T: bytemuck::Pod> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aligned").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_buffer_starts_on_a_line_and_holds_what_was_copied() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let f: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let a = Aligned::copy_of(&f);
            assert!(is_line_aligned(&a), "f32 × {len}");
            assert_eq!(&a[..], &f[..]);
            let h: Vec<u16> = (0..len as u16).collect();
            let b = Aligned::copy_of(&h);
            assert!(is_line_aligned(&b), "u16 × {len}");
            assert_eq!(&b[..], &h[..]);
        }
    }
}
