//! A local TCP forwarder for an app that keeps one address while its back
//! end moves: each connection accepted locally is joined to the VM's
//! current endpoint for one guest port; when the session moves the VM,
//! connections to the old endpoint are closed (the app reconnects to the
//! same local address and reaches the VM where it runs now).

use cloudlet_api::PortMapping;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forward connections accepted on `listener` to the endpoint of
/// `guest_port` in `ports` (a session's [`crate::session::Session::endpoints`]),
/// until the listener fails.
pub async fn forward(
    listener: TcpListener,
    guest_port: u16,
    ports: watch::Receiver<Vec<PortMapping>>,
) -> std::io::Result<()> {
    loop {
        let (mut client, _) = listener.accept().await?;
        let _ = client.set_nodelay(true);
        let mut ports = ports.clone();
        tokio::spawn(async move {
            let Some(endpoint) = endpoint(&ports.borrow_and_update(), guest_port) else {
                return;
            };
            let Ok(mut upstream) = TcpStream::connect(&endpoint).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                // The VM moved: this connection's endpoint is gone.
                _ = ports.changed() => {}
            }
        });
    }
}

fn endpoint(ports: &[PortMapping], guest: u16) -> Option<String> {
    ports
        .iter()
        .find(|p| p.guest == guest)
        .map(|p| p.endpoint.clone())
}
