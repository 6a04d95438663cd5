//! A client for husk's REST API on its unix socket: one request per
//! connection, the bodies typed by `husk-api-types` (the ones the VMM
//! parses), and the `fault_message` of a refusal passed on.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_api_types::{
    Action, ActionType, BootSourceConfig, Drive, DriveUpdate, Fault, FsConfig, InstanceInfo,
    MachineConfig, MemoryHotplugConfig, MemoryHotplugSizeUpdate, MemoryHotplugStatus,
    MetricsConfig, NetworkInterface, VmState, VmStateRequest, Vsock,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket failed.
    #[error("cannot talk to husk's API on {}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("husk API: malformed response: {0}")]
    Malformed(String),
    /// husk refused the request.
    #[error("husk API {method} {uri}: {status}: {fault}")]
    Refused {
        /// The method.
        method: String,
        /// The path.
        uri: String,
        /// The HTTP status.
        status: u16,
        /// husk's `fault_message`, or the body.
        fault: String,
    },
}

/// How long one call may take (InstanceStart loads the kernel).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest response read.
const MAX_RESPONSE: usize = 1 << 20;

/// The API of one husk process.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// The API served on `socket`.
    pub fn new(socket: &Path) -> Self {
        ApiClient {
            socket: socket.to_path_buf(),
        }
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
        move |source| ApiError::Io {
            path: self.socket.clone(),
            source,
        }
    }

    /// Sends `method uri` with an optional JSON body; returns the response
    /// body of a 2xx answer (empty for 204).
    fn call(&self, method: &str, uri: &str, body: Option<String>) -> Result<Vec<u8>, ApiError> {
        let mut s = UnixStream::connect(&self.socket).map_err(self.io())?;
        s.set_read_timeout(Some(CALL_TIMEOUT)).map_err(self.io())?;
        s.set_write_timeout(Some(CALL_TIMEOUT)).map_err(self.io())?;
        let body = body.unwrap_or_default();
        let mut request = format!("{method} {uri} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n");
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(request.as_bytes()).map_err(self.io())?;
        let (status, body) = read_response(&mut s).map_err(|e| match e {
            ReadError::Io(source) => ApiError::Io {
                path: self.socket.clone(),
                source,
            },
            ReadError::Malformed(m) => ApiError::Malformed(m),
        })?;
        if !(200..300).contains(&status) {
            let fault = serde_json::from_slice::<Fault>(&body)
                .map(|f| f.fault_message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ApiError::Refused {
                method: method.into(),
                uri: uri.into(),
                status,
                fault,
            });
        }
        Ok(body)
    }

    fn send<B: Serialize>(&self, method: &str, uri: &str, body: &B) -> Result<(), ApiError> {
        let body = serde_json::to_string(body)
            .map_err(|e| ApiError::Malformed(format!("cannot encode the request ({e})")))?;
        self.call(method, uri, Some(body)).map(drop)
    }

    fn get<T: DeserializeOwned>(&self, uri: &str) -> Result<T, ApiError> {
        let body = self.call("GET", uri, None)?;
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Malformed(format!("GET {uri} answered {e}")))
    }

    /// `GET /`: the instance's id and state (it answers once husk serves).
    pub fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        self.get("/")
    }

    /// `PUT /machine-config`.
    pub fn put_machine_config(&self, config: &MachineConfig) -> Result<(), ApiError> {
        self.send("PUT", "/machine-config", config)
    }

    /// `PUT /boot-source`.
    pub fn put_boot_source(&self, boot: &BootSourceConfig) -> Result<(), ApiError> {
        self.send("PUT", "/boot-source", boot)
    }

    /// `PUT /drives/{drive_id}`.
    pub fn put_drive(&self, drive: &Drive) -> Result<(), ApiError> {
        self.send("PUT", &format!("/drives/{}", drive.drive_id), drive)
    }

    /// `PATCH /drives/{drive_id}`: a running VM's drive gets a new backing file.
    pub fn patch_drive(&self, update: &DriveUpdate) -> Result<(), ApiError> {
        self.send("PATCH", &format!("/drives/{}", update.drive_id), update)
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), ApiError> {
        self.send(
            "PUT",
            &format!("/network-interfaces/{}", iface.iface_id),
            iface,
        )
    }

    /// `PUT /fs/{id}`: a virtio-fs device served by a vhost-user backend.
    pub fn put_fs(&self, fs: &FsConfig) -> Result<(), ApiError> {
        self.send("PUT", &format!("/fs/{}", fs.id), fs)
    }

    /// `PUT /vsock`.
    pub fn put_vsock(&self, vsock: &Vsock) -> Result<(), ApiError> {
        self.send("PUT", "/vsock", vsock)
    }

    /// `PUT /metrics`: where husk writes its counters.
    pub fn put_metrics(&self, metrics_path: &Path) -> Result<(), ApiError> {
        self.send(
            "PUT",
            "/metrics",
            &MetricsConfig {
                metrics_path: metrics_path.to_path_buf(),
            },
        )
    }

    /// `PUT /actions`.
    pub fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.send("PUT", "/actions", &Action { action_type })
    }

    /// `PUT /snapshot/load`: the VM restored from a snapshot instead of
    /// booted (husk's overrides beside Firecracker's in `params`).
    pub fn load_snapshot(&self, params: &serde_json::Value) -> Result<(), ApiError> {
        self.send("PUT", "/snapshot/load", params)
    }

    /// `PUT /snapshot/create`: a full snapshot of the paused VM.
    pub fn create_snapshot(
        &self,
        snapshot_path: &Path,
        mem_file_path: &Path,
    ) -> Result<(), ApiError> {
        self.send(
            "PUT",
            "/snapshot/create",
            &serde_json::json!({
                "snapshot_type": "Full",
                "snapshot_path": snapshot_path,
                "mem_file_path": mem_file_path,
            }),
        )
    }

    /// `PATCH /vm`: pause or resume the vCPUs.
    pub fn set_vm_state(&self, state: VmStateRequest) -> Result<(), ApiError> {
        self.send("PATCH", "/vm", &VmState { state })
    }

    /// `PUT /hotplug/memory`: the hot-pluggable region, before start.
    pub fn put_memory_hotplug(&self, config: &MemoryHotplugConfig) -> Result<(), ApiError> {
        self.send("PUT", "/hotplug/memory", config)
    }

    /// `PATCH /hotplug/memory`: how much of the region the guest should
    /// have plugged.
    pub fn patch_memory_hotplug(&self, requested_size_mib: u64) -> Result<(), ApiError> {
        self.send(
            "PATCH",
            "/hotplug/memory",
            &MemoryHotplugSizeUpdate { requested_size_mib },
        )
    }

    /// `GET /hotplug/memory`: the region and what the guest has plugged.
    pub fn memory_hotplug(&self) -> Result<MemoryHotplugStatus, ApiError> {
        self.get("/hotplug/memory")
    }
}

enum ReadError {
    Io(std::io::Error),
    Malformed(String),
}

/// Reads one HTTP/1.1 response: the status and the body (Content-Length,
/// or up to EOF).
fn read_response(s: &mut impl Read) -> Result<(u16, Vec<u8>), ReadError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_RESPONSE {
            return Err(ReadError::Malformed("headers too long".into()));
        }
        let n = s.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Malformed(
                "connection closed before the headers ended".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ReadError::Malformed(format!("status line {status_line:?}")))?;
    let length: Option<usize> = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    });
    let mut body = buf[head_end..].to_vec();
    match length {
        Some(len) if len > MAX_RESPONSE => {
            return Err(ReadError::Malformed(format!("body of {len} bytes")))
        }
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk).map_err(ReadError::Io)?;
                if n == 0 {
                    return Err(ReadError::Malformed("body cut short".into()));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.take(MAX_RESPONSE as u64)
                .read_to_end(&mut body)
                .map_err(ReadError::Io)?;
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_and_without_length() {
        let mut r: &[u8] = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        let (s, b) = read_response(&mut r).ok().unwrap();
        assert_eq!((s, b.len()), (204, 0));
        let mut r: &[u8] =
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 25\r\n\r\n{\"fault_message\": \"bad\"}\nextra";
        let (s, b) = read_response(&mut r).ok().unwrap();
        assert_eq!(s, 400);
        assert_eq!(b, b"{\"fault_message\": \"bad\"}\n");
        let mut r: &[u8] = b"garbage\r\n\r\n";
        assert!(matches!(
            read_response(&mut r),
            Err(ReadError::Malformed(_))
        ));
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(matches!(
            read_response(&mut r),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn a_refusal_carries_the_fault_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = c.read(&mut req).unwrap();
            let req = String::from_utf8_lossy(&req[..n]).into_owned();
            let body = r#"{"fault_message":"drive slot0 is not configured"}"#;
            write!(
                c,
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            req
        });
        let e = ApiClient::new(&sock)
            .patch_drive(&DriveUpdate {
                drive_id: "slot0".into(),
                path_on_host: None,
                rate_limiter: None,
            })
            .unwrap_err();
        let req = server.join().unwrap();
        assert!(req.starts_with("PATCH /drives/slot0 HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with(r#"{"drive_id":"slot0"}"#), "{req}");
        assert_eq!(
            e.to_string(),
            "husk API PATCH /drives/slot0: 400: drive slot0 is not configured"
        );
    }
}
