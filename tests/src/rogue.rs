//! A rogue Modbus TCP unit: a proxy that rewrites the unit id of responses.
//!
//! [`UnitRewriter`] sits between a client (the gateway) and a Modbus TCP
//! server (a [`crate::sim::PlcSim`] or the pymodbus peer) and listens on a
//! free loopback port. Requests pass unchanged. The response stream is cut
//! into MBAP frames ([`MbapFramer`]: a frame may arrive split over several
//! reads or several frames in one read) and, while
//! [`UnitRewriter::set_answer_unit`] holds `Some(u)`, the unit id byte of
//! each frame (offset 6) is replaced with `u`: a device that is not in the
//! gateway's configuration answering in the configured one's place.
//!
//! Each client connection gets its own connection to the target; when either
//! side closes (or sends a frame that is not MBAP), both are closed.
//! Dropping the handle stops listening and closes every connection.

use anyhow::Context as _;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Bytes of the MBAP header: transaction id, protocol id, length, unit id.
pub const MBAP_HEADER: usize = 7;
/// Offset of the unit id in the MBAP header.
pub const UNIT_ID_OFFSET: usize = 6;
/// Largest value of the MBAP length field: the unit id and a 253-byte PDU.
const MAX_LENGTH: u16 = 254;
/// Smallest value of the MBAP length field: the unit id and a function code.
const MIN_LENGTH: u16 = 2;

/// A Modbus TCP proxy that can make every response come from another unit.
/// Stops on drop.
pub struct UnitRewriter {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    target: SocketAddr,
    answer_unit: Mutex<Option<u8>>,
    rewritten: AtomicU64,
}

impl Shared {
    fn answer_unit(&self) -> Option<u8> {
        *self.answer_unit.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl UnitRewriter {
    /// Listens on a free loopback port and forwards every connection to
    /// `target`, passing frames through unchanged until
    /// [`UnitRewriter::set_answer_unit`] says otherwise. Must be called
    /// from within a tokio runtime (it spawns the proxy's tasks).
    pub fn start(target: SocketAddr) -> anyhow::Result<UnitRewriter> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("the unit rewriter must be started within a tokio runtime")?;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("unit rewriter: binding a loopback port")?;
        listener
            .set_nonblocking(true)
            .context("unit rewriter: non-blocking listener")?;
        let addr = listener
            .local_addr()
            .context("unit rewriter: local address")?;
        let shared = Arc::new(Shared {
            target,
            answer_unit: Mutex::new(None),
            rewritten: AtomicU64::new(0),
        });
        let _guard = runtime.enter();
        let listener =
            TcpListener::from_std(listener).context("unit rewriter: registering the listener")?;
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(UnitRewriter {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to (instead of the target's).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `None`: responses pass unchanged. `Some(u)`: the unit id of every
    /// response frame from now on is `u`, on every connection.
    pub fn set_answer_unit(&self, unit: Option<u8>) {
        *self
            .shared
            .answer_unit
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = unit;
    }

    /// Response frames forwarded while an answer unit was set (counted even
    /// when the unit id already was that unit).
    pub fn rewritten(&self) -> u64 {
        self.shared.rewritten.load(Ordering::SeqCst)
    }
}

impl Drop for UnitRewriter {
    fn drop(&mut self) {
        // The accept task owns the connection tasks in a JoinSet, which
        // aborts them when the aborted task's future is dropped.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        if let Err(e) = relay(client, &shared).await {
                            tracing::debug!(%peer, error = %e, "unit rewriter connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unit rewriter: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Relays one client connection until either side closes or fails; both
/// streams are dropped (closed) on return.
async fn relay(mut client: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    let mut server = TcpStream::connect(shared.target)
        .await
        .with_context(|| format!("connecting to the target {}", shared.target))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.split();
    let (mut server_rx, mut server_tx) = server.split();
    // Whichever direction ends first ends the connection; the other one is
    // dropped mid-copy, which loses nothing that matters: its peer is gone.
    tokio::select! {
        r = tokio::io::copy(&mut client_rx, &mut server_tx) => {
            r.context("client to target")?;
        }
        r = relay_responses(&mut server_rx, &mut client_tx, shared) => {
            r.context("target to client")?;
        }
    }
    Ok(())
}

/// Copies the response stream frame by frame, rewriting unit ids.
async fn relay_responses<R, W>(from: &mut R, to: &mut W, shared: &Shared) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut framer = MbapFramer::default();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut out = Vec::with_capacity(n);
        for mut frame in framer.push(&buf[..n])? {
            if let Some(unit) = shared.answer_unit() {
                frame[UNIT_ID_OFFSET] = unit;
                shared.rewritten.fetch_add(1, Ordering::SeqCst);
            }
            out.extend_from_slice(&frame);
        }
        if !out.is_empty() {
            to.write_all(&out).await?;
        }
    }
}

/// A byte stream that is not Modbus TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The protocol id is not 0 (Modbus).
    ProtocolId(u16),
    /// The length field is outside 2..=254.
    Length(u16),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ProtocolId(p) => write!(f, "MBAP protocol id {p} is not 0 (Modbus)"),
            FrameError::Length(n) => write!(
                f,
                "MBAP length {n} is outside {MIN_LENGTH}..={MAX_LENGTH} (unit id and PDU)"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Cuts a Modbus TCP byte stream into whole MBAP frames (no I/O).
///
/// A frame is the 7-byte header (transaction id, protocol id, length, unit
/// id) and the PDU; the length field counts the unit id and the PDU, so a
/// frame has `6 + length` bytes.
#[derive(Debug, Default)]
pub struct MbapFramer {
    pending: Vec<u8>,
}

impl MbapFramer {
    /// Appends `bytes` and returns the frames completed, in order. Bytes of
    /// an incomplete frame are kept for the next call.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, FrameError> {
        self.pending.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut start = 0;
        while self.pending.len() - start >= MBAP_HEADER {
            let header = &self.pending[start..start + MBAP_HEADER];
            let protocol = u16::from_be_bytes([header[2], header[3]]);
            if protocol != 0 {
                return Err(FrameError::ProtocolId(protocol));
            }
            let length = u16::from_be_bytes([header[4], header[5]]);
            if !(MIN_LENGTH..=MAX_LENGTH).contains(&length) {
                return Err(FrameError::Length(length));
            }
            let end = start + 6 + usize::from(length);
            if self.pending.len() < end {
                break;
            }
            frames.push(self.pending[start..end].to_vec());
            start = end;
        }
        self.pending.drain(..start);
        Ok(frames)
    }

    /// Bytes of an incomplete frame held back.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{PlcSim, UNIT_ID};
    use std::time::Duration;
    use tokio_modbus::client::{tcp, Reader as _};
    use tokio_modbus::Slave;

    /// A response frame: read holding registers (FC 3) answering `regs`.
    fn frame(transaction: u16, unit: u8, regs: &[u16]) -> Vec<u8> {
        let mut pdu = vec![3, (regs.len() * 2) as u8];
        pdu.extend(regs.iter().flat_map(|r| r.to_be_bytes()));
        let mut f = transaction.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&(1 + pdu.len() as u16).to_be_bytes());
        f.push(unit);
        f.extend(pdu);
        f
    }

    async fn sim_and_rewriter() -> (PlcSim, UnitRewriter) {
        let sim = PlcSim::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let rogue = UnitRewriter::start(sim.addr()).unwrap();
        (sim, rogue)
    }

    #[test]
    fn the_framer_joins_split_frames_and_splits_coalesced_ones() {
        let a = frame(1, 1, &[0x1111]);
        let b = frame(2, 1, &[0x2222, 0x3333]);
        let c = frame(3, 1, &[]);
        let stream: Vec<u8> = [a.clone(), b.clone(), c.clone()].concat();
        // One byte at a time.
        let mut framer = MbapFramer::default();
        let mut got = Vec::new();
        for byte in &stream {
            got.extend(framer.push(std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(got, [a.clone(), b.clone(), c.clone()]);
        assert_eq!(framer.pending(), 0);
        // All at once, and cut inside the header and inside the PDU.
        for cut in [0, 3, a.len() + 7, stream.len() - 1, stream.len()] {
            let mut framer = MbapFramer::default();
            let mut got = framer.push(&stream[..cut]).unwrap();
            got.extend(framer.push(&stream[cut..]).unwrap());
            assert_eq!(got, [a.clone(), b.clone(), c.clone()], "cut at {cut}");
        }
    }

    #[test]
    fn the_framer_refuses_what_is_not_mbap() {
        let mut f = frame(1, 1, &[1]);
        f[3] = 1;
        assert_eq!(
            MbapFramer::default().push(&f),
            Err(FrameError::ProtocolId(1))
        );
        for length in [0u16, 1, 255, 0xffff] {
            let mut f = frame(1, 1, &[1]);
            f[4..6].copy_from_slice(&length.to_be_bytes());
            assert_eq!(
                MbapFramer::default().push(&f),
                Err(FrameError::Length(length))
            );
        }
    }

    #[tokio::test]
    async fn frames_pass_unchanged_without_an_answer_unit() {
        let (sim, rogue) = sim_and_rewriter().await;
        assert_ne!(rogue.addr(), sim.addr());
        sim.freeze(true);
        let mut a = tcp::connect_slave(rogue.addr(), Slave(UNIT_ID))
            .await
            .unwrap();
        let mut b = tcp::connect_slave(rogue.addr(), Slave(UNIT_ID))
            .await
            .unwrap();
        for _ in 0..3 {
            let ra = a.read_holding_registers(0, 22).await.unwrap().unwrap();
            let rb = b.read_holding_registers(0, 22).await.unwrap().unwrap();
            assert_eq!(ra, sim.holdings(0, 22));
            assert_eq!(rb, ra);
        }
        assert_eq!(sim.read_frames(), 6);
        assert_eq!(sim.connections(), 2);
        assert_eq!(rogue.rewritten(), 0);
    }

    #[tokio::test]
    async fn an_answer_unit_makes_the_client_see_a_foreign_unit() {
        let (sim, rogue) = sim_and_rewriter().await;
        let mut ctx = tcp::connect_slave(rogue.addr(), Slave(UNIT_ID))
            .await
            .unwrap();
        ctx.read_holding_registers(0, 2).await.unwrap().unwrap();
        rogue.set_answer_unit(Some(7));
        let e = ctx.read_holding_registers(0, 2).await.unwrap_err();
        assert!(
            matches!(
                e,
                tokio_modbus::Error::Protocol(tokio_modbus::ProtocolError::HeaderMismatch { .. })
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("unit_id: 7"), "{text}");
        assert_eq!(rogue.rewritten(), 1);
        assert_eq!(sim.read_frames(), 2, "the request reached the device");
        // Healed, the same connection works again.
        rogue.set_answer_unit(None);
        ctx.read_holding_registers(0, 2).await.unwrap().unwrap();
        assert_eq!(rogue.rewritten(), 1);
    }

    /// A fake target that answers any request with `chunks`, written one by
    /// one with a pause between, then waits for the client to close.
    async fn scripted_target(chunks: Vec<Vec<u8>>) -> (SocketAddr, JoinHandle<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 12];
            s.read_exact(&mut req).await.unwrap();
            for c in chunks {
                s.write_all(&c).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            // True when the proxy closed the target side.
            let mut rest = Vec::new();
            matches!(
                tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await,
                Ok(Ok(0))
            )
        });
        (addr, task)
    }

    #[tokio::test]
    async fn frames_split_or_coalesced_on_the_wire_are_each_rewritten() {
        let a = frame(1, 1, &[0xaaaa]);
        let b = frame(2, 1, &[0xbbbb, 0xcccc]);
        let c = frame(3, 1, &[0xdddd]);
        let chunks = vec![
            [a.clone(), b.clone(), c[..4].to_vec()].concat(),
            c[4..9].to_vec(),
            c[9..].to_vec(),
        ];
        let (target, task) = scripted_target(chunks).await;
        let rogue = UnitRewriter::start(target).unwrap();
        rogue.set_answer_unit(Some(42));
        let mut client = TcpStream::connect(rogue.addr()).await.unwrap();
        client.write_all(&[0u8; 12]).await.unwrap();
        let mut got = vec![0u8; a.len() + b.len() + c.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        let expected: Vec<u8> = [a, b, c]
            .into_iter()
            .flat_map(|mut f| {
                f[UNIT_ID_OFFSET] = 42;
                f
            })
            .collect();
        assert_eq!(got, expected);
        assert_eq!(rogue.rewritten(), 3);
        drop(client);
        assert!(
            task.await.unwrap(),
            "the client closed: the target side closes too"
        );
    }

    #[tokio::test]
    async fn the_client_side_closes_when_the_target_goes_away_and_on_drop() {
        let (sim, rogue) = sim_and_rewriter().await;
        let mut ctx = tcp::connect_slave(rogue.addr(), Slave(UNIT_ID))
            .await
            .unwrap();
        ctx.read_holding_registers(0, 1).await.unwrap().unwrap();
        sim.stop().await;
        let r =
            tokio::time::timeout(Duration::from_secs(2), ctx.read_holding_registers(0, 1)).await;
        assert!(matches!(r, Ok(Err(_))), "closed with the target: {r:?}");

        sim.restart().await.unwrap();
        let mut raw = TcpStream::connect(rogue.addr()).await.unwrap();
        let addr = rogue.addr();
        drop(rogue);
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(2), raw.read_to_end(&mut rest)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "closed on drop: {r:?}");
        // Give the runtime a moment to drop the aborted listener.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "nothing listens after drop"
        );
    }
}
