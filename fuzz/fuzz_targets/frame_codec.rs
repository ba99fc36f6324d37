//! The frame codec (PROTOCOL.md Frames) on arbitrary bytes, as a peer
//! would send them, split into arbitrary reads: it never panics, never
//! yields a payload over its limit, never lets its buffer grow past one
//! frame's worth from a length it was sent, and every frame it yields
//! encodes back to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};
use tollgate::wire::{CodecError, FrameCodec};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // The first byte picks the limit (hello_max_frame-like to max_frame-like)
    // and the size of each read.
    let max = if first & 1 == 0 { 16 << 10 } else { 1 << 20 };
    let read = 1 + (first >> 1) as usize * 7;
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut consumed = Vec::new();
    for chunk in rest.chunks(read) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= max as usize, "a payload over the limit");
                    let mut out = BytesMut::new();
                    codec.encode(frame, &mut out).unwrap();
                    assert_eq!(&out[..], &before[..out.len()], "decode and encode disagree");
                    consumed.extend_from_slice(&out);
                }
                Ok(None) => break,
                Err(CodecError::Io(_)) => unreachable!("no I/O here"),
                Err(_) => return,
            }
            // Reserved only for a checked length: one frame, its header,
            // and what the peer already sent.
            assert!(
                buf.capacity() <= (max as usize + 5).max(before.len()) + rest.len() + 64,
                "capacity {} for a limit of {max}",
                buf.capacity()
            );
        }
    }
    assert!(consumed.len() <= rest.len());
});
