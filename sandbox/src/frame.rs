//! Framed IPC over a Unix stream socket: `[u32 little-endian length][u8 version][payload]`, the
//! length counting the version byte and payload. Every read is bounded by a limit the reader
//! chooses, so a hostile peer can make a read fail, never make it allocate without bound.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Version of the frame format and of the messages inside it; both sides must agree.
pub const PROTOCOL_VERSION: u8 = 1;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("empty frame")]
    Empty,
    #[error("protocol version {got}, expected {PROTOCOL_VERSION}")]
    Version { got: u8 },
    #[error("ipc: {0}")]
    Io(#[from] io::Error),
}

/// One end of the supervisor/worker connection.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Self {
        Channel { stream }
    }

    /// Sends one frame.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        let len = u32::try_from(payload.len() + 1).map_err(|_| FrameError::TooLarge {
            len: payload.len() as u64 + 1,
            max: u32::MAX as u64,
        })?;
        let mut header = [0u8; 5];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4] = PROTOCOL_VERSION;
        let timed_out = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::Timeout,
            _ => FrameError::Io(e),
        };
        self.stream.write_all(&header).map_err(timed_out)?;
        self.stream.write_all(payload).map_err(timed_out)?;
        Ok(())
    }

    /// Bounds how long [`Self::send`] may wait for a peer that does not read (`None`: no
    /// bound); past it, the send fails with [`FrameError::Timeout`] and the frame may be cut,
    /// so the channel can no longer be used.
    pub fn set_send_timeout(&mut self, timeout: Option<Duration>) -> Result<(), FrameError> {
        self.stream
            .set_write_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))?;
        Ok(())
    }

    /// Receives one frame of at most `max` payload bytes, waiting at most `timeout` (forever
    /// if `None`) for the whole frame.
    pub fn recv(&mut self, max: usize, timeout: Option<Duration>) -> Result<Vec<u8>, FrameError> {
        match timeout {
            Some(t) => self.recv_by(max, Instant::now() + t),
            None => {
                self.stream.set_read_timeout(None)?;
                self.recv_frame(max, None)
            }
        }
    }

    /// Receives one frame of at most `max` payload bytes that must arrive, whole, by
    /// `deadline`. Unlike [`Self::recv`], a peer that drips a byte at a time cannot stretch the
    /// wait: each read waits only for what is left of the deadline.
    pub fn recv_by(&mut self, max: usize, deadline: Instant) -> Result<Vec<u8>, FrameError> {
        self.recv_frame(max, Some(deadline))
    }

    fn recv_frame(&mut self, max: usize, deadline: Option<Instant>) -> Result<Vec<u8>, FrameError> {
        let mut len = [0u8; 4];
        self.read_by(&mut len, deadline)?;
        let len = u32::from_le_bytes(len) as u64;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len - 1 > max as u64 {
            return Err(FrameError::TooLarge {
                len: len - 1,
                max: max as u64,
            });
        }
        let mut version = [0u8; 1];
        self.read_by(&mut version, deadline)?;
        if version[0] != PROTOCOL_VERSION {
            return Err(FrameError::Version { got: version[0] });
        }
        let mut payload = vec![0u8; (len - 1) as usize];
        self.read_by(&mut payload, deadline)?;
        Ok(payload)
    }

    /// Whether a frame (or EOF) is waiting, without blocking.
    pub fn readable(&self) -> bool {
        self.wait_readable(Duration::ZERO)
    }

    /// Waits up to `timeout` for a frame (or EOF) to start arriving.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.stream),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0 && pfd.revents != 0
    }

    /// Fills `buf`, each read waiting only for what is left of `deadline` (no deadline: the
    /// socket's blocking reads).
    fn read_by(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> Result<(), FrameError> {
        let mut filled = 0;
        while filled < buf.len() {
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(FrameError::Timeout);
                }
                self.stream.set_read_timeout(Some(left))?;
            }
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) => return Err(FrameError::Closed),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(FrameError::Timeout)
                }
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        Ok(())
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a), b)
    }

    #[test]
    fn round_trip() {
        let (mut a, b) = pair();
        let mut b = Channel::new(b);
        a.send(b"hello").unwrap();
        assert_eq!(b.recv(16, None).unwrap(), b"hello");
    }

    #[test]
    fn hostile_frames_are_errors() {
        let (mut a, mut raw) = pair();
        raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            a.recv(1024, None),
            Err(FrameError::TooLarge { .. })
        ));

        let (mut a, mut raw) = pair();
        raw.write_all(&[0, 0, 0, 0]).unwrap();
        assert!(matches!(a.recv(1024, None), Err(FrameError::Empty)));

        let (mut a, mut raw) = pair();
        raw.write_all(&[3, 0, 0, 0, 9, b'h', b'i']).unwrap();
        assert!(matches!(
            a.recv(1024, None),
            Err(FrameError::Version { got: 9 })
        ));

        let (mut a, mut raw) = pair();
        raw.write_all(&[10, 0, 0, 0, PROTOCOL_VERSION, b'x'])
            .unwrap();
        drop(raw);
        assert!(matches!(a.recv(1024, None), Err(FrameError::Closed)));

        let (mut a, _raw) = pair();
        assert!(matches!(
            a.recv(1024, Some(Duration::from_millis(20))),
            Err(FrameError::Timeout)
        ));
    }

    #[test]
    fn a_dripping_peer_cannot_stretch_the_frame_deadline() {
        let (mut a, mut raw) = pair();
        let drip = std::thread::spawn(move || {
            // A 100-byte frame, one byte every 50 ms: 5 s in all, each read well inside any
            // per-read timeout.
            raw.write_all(&[101, 0, 0, 0, PROTOCOL_VERSION]).unwrap();
            for _ in 0..100 {
                if raw.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let r = a.recv_by(1024, started + Duration::from_millis(400));
        assert!(matches!(r, Err(FrameError::Timeout)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(a);
        drip.join().unwrap();
    }
}
