//! The running server's end of the admin socket: listening on
//! `DATA/admin.sock`, reading each connection's request and carrying it
//! out with the volume and export registries.

use std::path::Path;
use std::sync::Arc;

use super::{apply, snapshot_json, volume_of, Op, Reply, Request, SOCKET, VERSION};
use crate::error::{Error, Result};
use crate::exports::Exports;
use crate::volumes::Volumes;

/// Listen on `DATA/admin.sock`, for root only.
pub fn listen(data: &Path) -> Result<tokio::net::UnixListener> {
    let path = data.join(SOCKET);
    // We hold the server lock: a socket left there is a dead server's.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| Error::io(format!("restricting {}", path.display()), e))?;
    Ok(listener)
}

/// Answer the requests that come to `listener`, each connection on a task
/// of its own, until accepting fails.
pub async fn serve(
    listener: tokio::net::UnixListener,
    volumes: Arc<Volumes>,
    exports: Arc<Exports>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let volumes = volumes.clone();
                let exports = exports.clone();
                tokio::spawn(async move {
                    let handled =
                        serve_one(stream, async |op| dispatch(&volumes, &exports, op).await).await;
                    if let Err(e) = handled {
                        tracing::warn!("admin request failed: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::error!("admin socket: {e}");
                return;
            }
        }
    }
}

/// Serve one admin connection's request with `handle`.
async fn serve_one(
    stream: tokio::net::UnixStream,
    handle: impl AsyncFnOnce(Op) -> Result<serde_json::Value>,
) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read).take(64 << 10);
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| Error::io("reading an admin request", e))?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(r) if r.v == VERSION => match handle(r.op).await {
            Ok(info) => Reply::Ok(info),
            Err(e) => Reply::Error(e.to_string()),
        },
        Ok(r) => Reply::Error(format!(
            "admin protocol {} is not spoken here ({VERSION} is)",
            r.v
        )),
        Err(e) => Reply::Error(format!("malformed admin request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).map_err(|e| Error::Corrupt(e.to_string()))?;
    out.push(b'\n');
    write
        .write_all(&out)
        .await
        .map_err(|e| Error::io("answering an admin request", e))
}

/// Carry out an admin request in the server.
pub async fn dispatch(volumes: &Volumes, exports: &Exports, op: Op) -> Result<serde_json::Value> {
    match op {
        Op::Export(spec) => exports.start(volumes, spec).await,
        Op::Unexport { name } => exports.stop(&name).await,
        Op::Exports => Ok(serde_json::Value::Array(exports.list())),
        Op::CheckImage { volume } => {
            let check = volumes.check_image(&volume).await?;
            if check.damaged > 0 {
                tracing::warn!(
                    volume,
                    ?check,
                    "image checked: blocks differed from the version"
                );
            }
            Ok(serde_json::json!(check))
        }
        op => {
            let volume = volume_of(&op).unwrap_or_default();
            let v = volumes.open_named(volume)?;
            let mut v = v.lock().await;
            let done = tokio::task::block_in_place(|| apply(&mut v, &op));
            if let Ok(info) = &done {
                tracing::info!(?op, snapshot = %info.name, "admin request done");
            }
            done.map(|info| snapshot_json(&info))
        }
    }
}
