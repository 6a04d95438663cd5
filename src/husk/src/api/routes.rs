//! Which method and path mean which controller request: the route table
//! (also checked against docs/api.yaml by a test), and turning a request's
//! JSON body into the typed body it must be, with a 400 naming what is wrong
//! when it is not.

use serde::de::DeserializeOwned;
use vmm::controller::{Action, Request, VmState};

use super::http::Response;

/// Every route the API serves: (method, path template).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("PUT", "/actions"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/fs/{fs_id}"),
    ("GET", "/hotplug/memory"),
    ("PUT", "/hotplug/memory"),
    ("PATCH", "/hotplug/memory"),
    ("PUT", "/logger"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/metrics"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/vsock"),
];

/// Matches `path` against a template; returns the `{param}` value if any.
fn matches<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut param = None;
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(param),
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return None;
                }
                param = Some(ps);
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::fault(400, "this request needs a JSON body"));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| Response::fault(400, format!("invalid request body: {e}")))
}

/// Turns a method, a path and a body into a controller request, or the
/// error response (404 unknown path, 405 wrong method, 400 bad body).
pub fn route(method: &str, path: &str, bytes: &[u8]) -> Result<Request, Response> {
    // Trailing slashes are tolerated ("/machine-config/"), except on "/".
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let Some((template, param)) = ROUTES.iter().find_map(|(m, t)| {
        (*m == method)
            .then_some(t)
            .and_then(|t| matches(t, path).map(|p| (*t, p)))
    }) else {
        let allowed: Vec<&str> = ROUTES
            .iter()
            .filter(|(_, t)| matches(t, path).is_some())
            .map(|(m, _)| *m)
            .collect();
        if allowed.is_empty() {
            return Err(Response::fault(404, format!("no such resource: {path}")));
        }
        let mut r = Response::fault(
            405,
            format!(
                "{method} is not allowed on {path}; use {}",
                allowed.join(", ")
            ),
        );
        r.headers.push(("Allow", allowed.join(", ")));
        return Err(r);
    };
    let id = || param.unwrap_or_default().to_string();
    Ok(match (method, template) {
        ("GET", "/") => Request::GetInstanceInfo,
        ("GET", "/machine-config") => Request::GetMachineConfig,
        ("GET", "/vm/config") => Request::GetVmConfig,
        ("PUT", "/machine-config") => Request::PutMachineConfig(body(bytes)?),
        ("PATCH", "/machine-config") => Request::PatchMachineConfig(body(bytes)?),
        ("PUT", "/boot-source") => Request::PutBootSource(body(bytes)?),
        ("PUT", "/drives/{drive_id}") => Request::PutDrive(id(), body(bytes)?),
        ("PATCH", "/drives/{drive_id}") => Request::PatchDrive(id(), body(bytes)?),
        ("PUT", "/network-interfaces/{iface_id}") => {
            Request::PutNetworkInterface(id(), body(bytes)?)
        }
        ("PUT", "/vsock") => Request::PutVsock(body(bytes)?),
        ("PUT", "/fs/{fs_id}") => Request::PutFs(id(), body(bytes)?),
        ("PUT", "/actions") => Request::Action(body::<Action>(bytes)?.action_type),
        ("PATCH", "/vm") => Request::PatchVm(body::<VmState>(bytes)?.state),
        ("PUT", "/logger") => Request::PutLogger(body(bytes)?),
        ("PUT", "/metrics") => Request::PutMetrics(body(bytes)?),
        ("GET", "/hotplug/memory") => Request::GetMemoryHotplug,
        ("PUT", "/hotplug/memory") => Request::PutMemoryHotplug(body(bytes)?),
        ("PATCH", "/hotplug/memory") => Request::PatchMemoryHotplug(body(bytes)?),
        ("PUT", "/snapshot/create") => Request::CreateSnapshot(body(bytes)?),
        ("PUT", "/snapshot/load") => Request::LoadSnapshot(body(bytes)?),
        _ => {
            return Err(Response::fault(
                500,
                format!("route {method} {template} has no handler"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::controller::{ActionType, VmStateRequest};

    fn status(r: Result<Request, Response>) -> u16 {
        r.err().map(|r| r.status).unwrap_or(0)
    }

    #[test]
    fn every_route_has_a_handler() {
        for (method, template) in ROUTES {
            let path = template
                .replace("{drive_id}", "d")
                .replace("{iface_id}", "eth0")
                .replace("{fs_id}", "fs0");
            // With an empty body a handler answers 400 (body needed) or
            // succeeds; never 404, 405 or 500.
            let s = status(route(method, &path, b""));
            assert!(s == 0 || s == 400, "{method} {template}: {s}");
        }
    }

    #[test]
    fn paths_methods_and_bodies() {
        assert_eq!(route("GET", "/", b"").unwrap(), Request::GetInstanceInfo);
        assert_eq!(
            route("GET", "/machine-config/", b"").unwrap(),
            Request::GetMachineConfig
        );
        assert_eq!(
            route("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#).unwrap(),
            Request::Action(ActionType::InstanceStart)
        );
        assert_eq!(
            route("PATCH", "/vm", br#"{"state":"Paused"}"#).unwrap(),
            Request::PatchVm(VmStateRequest::Paused)
        );
        let Request::PutDrive(id, d) = route(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!((id.as_str(), d.is_root_device), ("rootfs", true));

        assert_eq!(status(route("GET", "/nope", b"")), 404);
        assert_eq!(status(route("GET", "/drives", b"")), 404);
        assert_eq!(status(route("GET", "/drives/", b"")), 404);
        assert_eq!(status(route("GET", "/drives/a/b", b"")), 404);
        let r = route("DELETE", "/machine-config", b"").unwrap_err();
        assert_eq!(r.status, 405);
        assert!(r
            .headers
            .contains(&("Allow", "GET, PUT, PATCH".to_string())));
        assert_eq!(status(route("PUT", "/actions", b"{")), 400);
        assert_eq!(
            status(route("PUT", "/actions", br#"{"action_type":"Fly"}"#)),
            400
        );
        assert_eq!(
            status(route(
                "PUT",
                "/actions",
                br#"{"action_type":"InstanceStart","x":1}"#
            )),
            400
        );
        assert_eq!(
            status(route("PUT", "/machine-config", br#"{"vcpu_count":1}"#)),
            400
        );
        assert_eq!(
            status(route(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count":-1,"mem_size_mib":64}"#
            )),
            400
        );
        assert_eq!(status(route("PUT", "/boot-source", b"   ")), 400);
        // Memory hot-plug: Firecracker's bodies, unknown fields refused.
        assert_eq!(
            route("PATCH", "/hotplug/memory", br#"{"requested_size_mib":512}"#).unwrap(),
            Request::PatchMemoryHotplug(vmm::controller::MemoryHotplugSizeUpdate {
                requested_size_mib: 512
            })
        );
        assert!(matches!(
            route("PUT", "/hotplug/memory", br#"{"total_size_mib":1024}"#).unwrap(),
            Request::PutMemoryHotplug(h) if h.slot_size_mib == 128
        ));
        assert_eq!(
            status(route(
                "PATCH",
                "/hotplug/memory",
                br#"{"requested_size_mib":"lots"}"#
            )),
            400
        );
        assert_eq!(
            status(route(
                "PUT",
                "/hotplug/memory",
                br#"{"total_size_mib":1,"x":2}"#
            )),
            400
        );
        assert_eq!(status(route("DELETE", "/hotplug/memory", b"")), 405);
        assert_eq!(status(route("GET", "/hotplug", b"")), 404);
    }
}

#[cfg(test)]
mod openapi_sync {
    use super::ROUTES;
    use std::collections::BTreeSet;

    /// (METHOD, path) pairs under `paths:` in docs/api.yaml: paths are keys
    /// indented two spaces, methods keys indented four.
    fn documented() -> BTreeSet<(String, String)> {
        let yaml =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.yaml"))
                .expect("docs/api.yaml");
        let mut out = BTreeSet::new();
        let mut in_paths = false;
        let mut path = None;
        for line in yaml.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /") {
                path = Some(format!("/{}", p.trim_end_matches(':')));
            } else if let Some(m) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':')) {
                if ["get", "put", "patch", "post", "delete"].contains(&m) {
                    if let Some(p) = &path {
                        out.insert((m.to_uppercase(), p.clone()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let code: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        let docs = documented();
        let undocumented: Vec<_> = code.difference(&docs).collect();
        let unserved: Vec<_> = docs.difference(&code).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from docs/api.yaml: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "docs/api.yaml documents routes husk does not serve: {unserved:?}"
        );
        assert_eq!(code.len(), ROUTES.len(), "duplicate routes");
    }
}
