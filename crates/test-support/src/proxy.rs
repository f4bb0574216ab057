//! A small TCP proxy placed between the worker and a server, to cut, stall and
//! refuse the link on command.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Bytes flow.
    Open,
    /// Connections stay up but no byte is forwarded.
    Stalled,
    /// New connections are closed at once; existing ones are cut.
    Refusing,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listens");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode::Open);
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let (mode, links) = (mode.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *mode.borrow() == Mode::Refusing {
                        reset(client);
                        continue;
                    }
                    let link = tokio::spawn(forward(client, target, mode.subscribe()));
                    let mut links = links.lock().expect("links lock");
                    links.retain(|l| !l.is_finished());
                    links.push(link);
                }
            })
        };
        Proxy {
            addr,
            mode,
            links,
            acceptor,
        }
    }

    /// Resets every live connection; new ones are still accepted.
    pub fn cut(&self) {
        for link in self.links.lock().expect("links lock").drain(..) {
            link.abort();
        }
    }

    /// Keeps connections open but forwards nothing until `resume`.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    /// Cuts every connection and refuses new ones until `resume`.
    pub fn refuse(&self) {
        self.mode.send_replace(Mode::Refusing);
        self.cut();
    }

    pub fn resume(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

/// Closes with RST rather than FIN, as a dropped link would look to the peer.
fn reset(stream: TcpStream) {
    stream.set_zero_linger().ok();
    drop(stream);
}

async fn forward(client: TcpStream, target: SocketAddr, mode: watch::Receiver<Mode>) {
    let Ok(server) = TcpStream::connect(target).await else {
        reset(client);
        return;
    };
    // Zero linger: any close of this link, a cut included, is a reset.
    for stream in [&client, &server] {
        stream.set_nodelay(true).ok();
        stream.set_zero_linger().ok();
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let upstream = pipe(client_read, server_write, mode.clone());
    let downstream = pipe(server_read, client_write, mode);
    // Whichever side ends first ends the link; dropping the halves closes both.
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // While stalled, hold the bytes; a cut aborts this task meanwhile.
        if mode.wait_for(|m| *m != Mode::Stalled).await.is_err() {
            return;
        }
        if *mode.borrow() == Mode::Refusing || to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
