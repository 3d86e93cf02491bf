//! The socket a connection task drives with readiness and non-blocking I/O: a TCP stream for
//! plain MQTT, or one end of a Unix socket pair whose other end the TLS or WebSocket edge
//! (`listener::edge`) pumps, so one connection task serves every transport.

use std::io::IoSlice;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

pub enum Socket {
    Tcp(TcpStream),
    Edge(UnixStream),
}

impl Socket {
    pub async fn readable(&self) -> std::io::Result<()> {
        match self {
            Socket::Tcp(s) => s.readable().await,
            Socket::Edge(s) => s.readable().await,
        }
    }

    pub async fn writable(&self) -> std::io::Result<()> {
        match self {
            Socket::Tcp(s) => s.writable().await,
            Socket::Edge(s) => s.writable().await,
        }
    }

    pub fn try_read_buf(&self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_read_buf(buf),
            Socket::Edge(s) => s.try_read_buf(buf),
        }
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_write_vectored(bufs),
            Socket::Edge(s) => s.try_write_vectored(bufs),
        }
    }

    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read_buf(buf).await,
            Socket::Edge(s) => s.read_buf(buf).await,
        }
    }

    /// Reads and drops input until the peer closes or the socket fails. The buffer is on the
    /// heap, and only while this runs: an array here would sit in every connection's future.
    pub async fn discard_until_closed(&mut self) {
        let mut sink = vec![0u8; 2048];
        loop {
            if self.readable().await.is_err() {
                return;
            }
            let read = match self {
                Socket::Tcp(s) => s.try_read(&mut sink),
                Socket::Edge(s) => s.try_read(&mut sink),
            };
            match read {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown().await,
            Socket::Edge(s) => s.shutdown().await,
        }
    }
}
