//! CreateSandbox: the pod's hostname, DNS, sysctls and network, applied to
//! the guest. Interfaces are found by MAC address (the VMM gave each virtio
//! NIC the MAC the host chose), renamed, given their MTU and their IPv4
//! and IPv6 addresses, and brought up; routes of either family follow.
//! Everything is checked before anything changes where that is possible.
//! (ioctls, not netlink: a few calls, no dependency.)

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use husk_protocol::{AgentError, ErrorCode, Interface, Route, Sandbox};

fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorCode::InvalidArgument, msg)
}

fn system(what: &str, e: std::io::Error) -> AgentError {
    crate::error::reply(ErrorCode::System, what, &e)
}

/// Applies `s` to this guest. `root` is where /etc and /proc live ("/" in a
/// guest; a scratch directory in host-side tests, where the network and the
/// hostname are left alone).
pub fn apply(s: &Sandbox, root: &std::path::Path, system_wide: bool) -> Result<(), AgentError> {
    if let Some(r) = &s.restored {
        crate::restore::check(r)?;
    }
    for key in s.sysctls.keys() {
        sysctl_path(root, key)?;
    }
    for i in &s.interfaces {
        parse_mac(&i.mac)?;
        if let Some(m) = &i.device_mac {
            parse_mac(m)?;
        }
        for a in &i.addresses {
            parse_cidr(a)?;
        }
    }
    for r in &s.routes {
        parse_route(r)?;
    }
    for ns in &s.dns {
        if ns.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(format!("name server {ns:?} is not an IP address")));
        }
    }
    if let Some(r) = &s.restored {
        if !system_wide {
            return Err(AgentError::new(
                ErrorCode::Unsupported,
                "a restored guest's reseed and clock need the agent to run as the guest's init",
            ));
        }
        crate::restore::apply(r)?;
    }
    if let Some(h) = &s.hostname {
        if h.is_empty() || h.len() > 64 || h.contains(['/', '\0']) {
            return Err(invalid(format!("invalid hostname {h:?}")));
        }
        if system_wide {
            // SAFETY: a valid buffer of the given length.
            if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } < 0 {
                return Err(system("sethostname", std::io::Error::last_os_error()));
            }
        }
        write(root, "etc/hostname", &format!("{h}\n"))?;
    }
    if !s.dns.is_empty() || !s.dns_search.is_empty() {
        let mut conf = String::new();
        if !s.dns_search.is_empty() {
            conf.push_str(&format!("search {}\n", s.dns_search.join(" ")));
        }
        for ns in &s.dns {
            conf.push_str(&format!("nameserver {ns}\n"));
        }
        write(root, "etc/resolv.conf", &conf)?;
    }
    for (key, value) in &s.sysctls {
        let path = sysctl_path(root, key)?;
        std::fs::write(&path, value).map_err(|e| system(&format!("sysctl {key}"), e))?;
    }
    if system_wide {
        let sock = Ioctl::new(libc::AF_INET)?;
        sock.up("lo")?;
        for i in &s.interfaces {
            configure_interface(&sock, i)?;
        }
        for r in &s.routes {
            sock.add_route(&parse_route(r)?)?;
        }
    } else if !s.interfaces.is_empty() || !s.routes.is_empty() {
        return Err(AgentError::new(
            ErrorCode::Unsupported,
            "network configuration needs the agent to run as the guest's init",
        ));
    }
    Ok(())
}

fn write(root: &std::path::Path, rel: &str, contents: &str) -> Result<(), AgentError> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| system(&format!("create {}", dir.display()), e))?;
    }
    std::fs::write(&path, contents).map_err(|e| system(&format!("write {}", path.display()), e))
}

/// net.ipv4.ip_forward -> <root>/proc/sys/net/ipv4/ip_forward, refusing
/// anything that could leave /proc/sys.
fn sysctl_path(root: &std::path::Path, key: &str) -> Result<std::path::PathBuf, AgentError> {
    let ok = !key.is_empty()
        && key.split(['.', '/']).all(|p| {
            !p.is_empty()
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        });
    if !ok {
        return Err(invalid(format!("invalid sysctl name {key:?}")));
    }
    Ok(root.join("proc/sys").join(key.replace('.', "/")))
}

fn parse_mac(s: &str) -> Result<[u8; 6], AgentError> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| {
            if p.len() == 2 {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(|| invalid(format!("invalid MAC {s:?}")))?;
    bytes
        .try_into()
        .map_err(|_| invalid(format!("invalid MAC {s:?}")))
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), AgentError> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| invalid(format!("address {s:?} needs a /prefix")))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| invalid(format!("invalid address {s:?}")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| invalid(format!("invalid prefix in {s:?}")))?;
    Ok((addr, len))
}

fn netmask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    })
}

struct ParsedRoute {
    dest: IpAddr,
    prefix: u8,
    gateway: Option<IpAddr>,
    device: Option<CString>,
}

fn parse_route(r: &Route) -> Result<ParsedRoute, AgentError> {
    let gateway = r
        .gateway
        .as_deref()
        .map(|g| {
            g.parse::<IpAddr>()
                .map_err(|_| invalid(format!("invalid gateway {g:?}")))
        })
        .transpose()?;
    // "default" is the default route of the gateway's family (IPv4 when
    // there is no gateway); "::/0" and "0.0.0.0/0" say it outright.
    let (dest, prefix) = if r.destination == "default" {
        match gateway {
            Some(IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        }
    } else {
        parse_cidr(&r.destination)?
    };
    if let Some(gw) = gateway {
        if gw.is_ipv4() != dest.is_ipv4() {
            return Err(invalid(format!(
                "route to {}: gateway {gw} is of the other address family",
                r.destination
            )));
        }
    }
    let device = r
        .device
        .as_deref()
        .map(|d| CString::new(d).map_err(|_| invalid("invalid device name")))
        .transpose()?;
    if gateway.is_none() && device.is_none() {
        return Err(invalid(format!(
            "route to {} needs a gateway or a device",
            r.destination
        )));
    }
    Ok(ParsedRoute {
        dest,
        prefix,
        gateway,
        device,
    })
}

/// The name of the interface with `mac`.
fn find_by_mac(mac: [u8; 6]) -> Result<String, AgentError> {
    let want = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let dir = std::fs::read_dir("/sys/class/net").map_err(|e| system("list interfaces", e))?;
    for entry in dir.flatten() {
        let addr = std::fs::read_to_string(entry.path().join("address")).unwrap_or_default();
        if addr.trim().eq_ignore_ascii_case(&want) {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(AgentError::new(
        ErrorCode::NotFound,
        format!("no interface with MAC {want}"),
    ))
}

fn configure_interface(sock: &Ioctl, i: &Interface) -> Result<(), AgentError> {
    let mac = parse_mac(&i.mac)?;
    let device_mac = match &i.device_mac {
        Some(m) => parse_mac(m)?,
        None => mac,
    };
    let current = find_by_mac(device_mac)?;
    if current != i.name {
        sock.rename(&current, &i.name)?;
    }
    if device_mac != mac {
        sock.set_mac(&i.name, mac)?;
    }
    if let Some(mtu) = i.mtu {
        sock.set_mtu(&i.name, mtu)?;
    }
    let mut v6 = Vec::new();
    for a in &i.addresses {
        match parse_cidr(a)? {
            (IpAddr::V4(addr), len) => sock.set_addr(&i.name, addr, netmask(len))?,
            (IpAddr::V6(addr), len) => v6.push((addr, len)),
        }
    }
    sock.up(&i.name)?;
    if !v6.is_empty() {
        // The host chose these addresses for this pod: no duplicate
        // detection, which would hold them back (tentative) for a second
        // or more after the pod starts.
        let dad = format!("/proc/sys/net/ipv6/conf/{}/accept_dad", i.name);
        std::fs::write(&dad, "0").map_err(|e| system(&dad, e))?;
        let sock6 = Ioctl::new(libc::AF_INET6)?;
        for (addr, len) in v6 {
            sock6.set_addr6(&i.name, addr, len)?;
        }
    }
    Ok(())
}

/// A datagram socket for interface and route ioctls (AF_INET, or AF_INET6
/// for IPv6 addresses and routes).
struct Ioctl(OwnedFd);

/// The kernel's `struct in6_rtmsg` (linux/ipv6_route.h), which libc
/// declares without public fields.
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn ifindex(name: &CString) -> Result<libc::c_int, AgentError> {
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if i == 0 {
        return Err(system(
            &format!("find interface {}", name.to_string_lossy()),
            std::io::Error::last_os_error(),
        ));
    }
    libc::c_int::try_from(i).map_err(|_| invalid("interface index out of range"))
}

fn ifreq(name: &str) -> Result<libc::ifreq, AgentError> {
    // SAFETY: ifreq is plain data; zero is a valid initial value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(invalid(format!("invalid interface name {name:?}")));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // the sockaddr as the family says.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl Ioctl {
    fn new(family: libc::c_int) -> Result<Self, AgentError> {
        // SAFETY: socket(2) with plain integer arguments; checked below.
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(system("socket", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(Ioctl(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn call(
        &self,
        what: &str,
        request: libc::c_ulong,
        arg: *mut libc::c_void,
    ) -> Result<(), AgentError> {
        // SAFETY: every caller passes the request's matching argument type.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), request, arg) } < 0 {
            return Err(system(what, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn up(&self, name: &str) -> Result<(), AgentError> {
        let mut req = ifreq(name)?;
        self.call(
            "SIOCGIFFLAGS",
            libc::SIOCGIFFLAGS,
            (&mut req as *mut libc::ifreq).cast(),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.call(
            &format!("bring {name} up"),
            libc::SIOCSIFFLAGS,
            (&mut req as *mut libc::ifreq).cast(),
        )
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), AgentError> {
        let mut req = ifreq(from)?;
        let new = ifreq(to)?;
        req.ifr_ifru.ifru_newname = new.ifr_name;
        self.call(
            &format!("rename {from} to {to}"),
            libc::SIOCSIFNAME,
            (&mut req as *mut libc::ifreq).cast(),
        )
    }

    fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<(), AgentError> {
        let mut req = ifreq(name)?;
        // SAFETY: sockaddr is plain data; zero is a valid initial value.
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        self.call(
            &format!("set the MAC address of {name}"),
            libc::SIOCSIFHWADDR,
            (&mut req as *mut libc::ifreq).cast(),
        )
    }

    fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), AgentError> {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = i32::try_from(mtu).map_err(|_| invalid(format!("MTU {mtu}")))?;
        self.call(
            &format!("set the MTU of {name}"),
            libc::SIOCSIFMTU,
            (&mut req as *mut libc::ifreq).cast(),
        )
    }

    fn set_addr(&self, name: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> Result<(), AgentError> {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.call(
            &format!("set the address of {name}"),
            libc::SIOCSIFADDR,
            (&mut req as *mut libc::ifreq).cast(),
        )?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.call(
            &format!("set the netmask of {name}"),
            libc::SIOCSIFNETMASK,
            (&mut req as *mut libc::ifreq).cast(),
        )
    }

    /// Adds an IPv6 address (on an AF_INET6 socket).
    fn set_addr6(&self, name: &str, addr: Ipv6Addr, prefix: u8) -> Result<(), AgentError> {
        let cname = CString::new(name).map_err(|_| invalid("invalid interface name"))?;
        let mut req = libc::in6_ifreq {
            ifr6_addr: libc::in6_addr {
                s6_addr: addr.octets(),
            },
            ifr6_prefixlen: u32::from(prefix),
            ifr6_ifindex: ifindex(&cname)?,
        };
        self.call(
            &format!("add {addr}/{prefix} to {name}"),
            libc::SIOCSIFADDR,
            (&mut req as *mut libc::in6_ifreq).cast(),
        )
    }

    /// Adds an IPv6 route (on an AF_INET6 socket).
    fn add_route6(&self, r: &ParsedRoute, dest: Ipv6Addr) -> Result<(), AgentError> {
        let zero = libc::in6_addr { s6_addr: [0; 16] };
        let mut rt = In6Rtmsg {
            dst: libc::in6_addr {
                s6_addr: dest.octets(),
            },
            src: zero,
            gateway: zero,
            kind: 0,
            dst_len: u16::from(r.prefix),
            src_len: 0,
            metric: 0,
            info: 0,
            flags: libc::RTF_UP as u32,
            ifindex: 0,
        };
        if let Some(IpAddr::V6(gw)) = r.gateway {
            rt.gateway = libc::in6_addr {
                s6_addr: gw.octets(),
            };
            rt.flags |= libc::RTF_GATEWAY as u32;
        }
        if let Some(dev) = &r.device {
            rt.ifindex = ifindex(dev)?;
        }
        self.call(
            "add an IPv6 route",
            libc::SIOCADDRT,
            (&mut rt as *mut In6Rtmsg).cast(),
        )
    }

    fn add_route(&self, r: &ParsedRoute) -> Result<(), AgentError> {
        let dest = match r.dest {
            IpAddr::V4(d) => d,
            IpAddr::V6(d) => return Ioctl::new(libc::AF_INET6)?.add_route6(r, d),
        };
        // SAFETY: rtentry is plain data; zero is a valid initial value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(dest);
        rt.rt_genmask = sockaddr_in(netmask(r.prefix));
        rt.rt_flags = libc::RTF_UP;
        if let Some(IpAddr::V4(gw)) = r.gateway {
            rt.rt_gateway = sockaddr_in(gw);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        if let Some(dev) = &r.device {
            // The kernel only reads the name during the call; `dev` outlives it.
            rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
        }
        self.call(
            "add a route",
            libc::SIOCADDRT,
            (&mut rt as *mut libc::rtentry).cast(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_sysctls_under_a_scratch_root() {
        let root = std::env::temp_dir().join(format!("husk-agent-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(root.join("proc/sys/net/ipv4")).unwrap();
        let s = Sandbox {
            hostname: Some("pod-a".into()),
            dns: vec!["10.0.0.10".into()],
            dns_search: vec!["svc.cluster.local".into()],
            sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        apply(&s, &root, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "pod-a\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(),
            "search svc.cluster.local\nnameserver 10.0.0.10\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("proc/sys/net/ipv4/ip_forward")).unwrap(),
            "1"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bad_values_are_refused_before_anything_changes() {
        let root =
            std::env::temp_dir().join(format!("husk-agent-sandbox-bad-{}", std::process::id()));
        let bad = |s: Sandbox| apply(&s, &root, false).unwrap_err().code;
        let sysctl = |k: &str| Sandbox {
            sysctls: [(k.to_string(), "1".to_string())].into(),
            hostname: Some("x".into()),
            ..Default::default()
        };
        for k in ["", "../../etc/passwd", "net..x", "a b"] {
            assert_eq!(bad(sysctl(k)), ErrorCode::InvalidArgument, "{k}");
        }
        assert!(!root.join("etc/hostname").exists(), "nothing was written");
        let iface = |mac: &str, addr: &str| Sandbox {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: mac.into(),
                device_mac: None,
                mtu: None,
                addresses: vec![addr.into()],
            }],
            ..Default::default()
        };
        assert_eq!(
            bad(iface("zz:00:00:00:00:00", "10.0.0.2/24")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            bad(iface("02:00:00:00:00:01", "10.0.0.2")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            bad(iface("02:00:00:00:00:01", "10.0.0.2/33")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            bad(iface("02:00:00:00:00:01", "fd00::2/129")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            bad(iface("02:00:00:00:00:01", "fd00::zz/64")),
            ErrorCode::InvalidArgument
        );
        let mut moved = iface("02:00:00:00:00:01", "10.0.0.2/24");
        moved.interfaces[0].device_mac = Some("02:00:00:00:00".into());
        assert_eq!(bad(moved), ErrorCode::InvalidArgument);
        // A restored guest's fresh start is checked, then refused outside
        // a guest (it would reseed and set this host's clock).
        let restored = |entropy: Vec<u8>| Sandbox {
            restored: Some(husk_protocol::Restored {
                entropy,
                realtime_ns: 1,
            }),
            ..Default::default()
        };
        assert_eq!(bad(restored(vec![7; 64])), ErrorCode::InvalidArgument);
        assert_eq!(bad(restored((0..64).collect())), ErrorCode::Unsupported);
        let route = |dest: &str, gw: &str| Sandbox {
            routes: vec![Route {
                destination: dest.into(),
                gateway: Some(gw.into()),
                device: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            bad(route("default", "10.0.0.1.5")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            bad(route("fd01::/64", "10.0.0.1")),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            bad(route("10.1.0.0/16", "fd00::1")),
            ErrorCode::InvalidArgument
        );
        // Well-formed networks of both families pass the checks (and then
        // need the agent as init to be applied).
        let ok = Sandbox {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                device_mac: None,
                mtu: None,
                addresses: vec!["10.0.0.2/24".into(), "fd00::2/64".into()],
            }],
            routes: vec![
                Route {
                    destination: "default".into(),
                    gateway: Some("fd00::1".into()),
                    device: None,
                },
                Route {
                    destination: "default".into(),
                    gateway: Some("10.0.0.1".into()),
                    device: None,
                },
            ],
            ..Default::default()
        };
        assert_eq!(bad(ok), ErrorCode::Unsupported);
        assert_eq!(
            bad(Sandbox {
                dns: vec!["dns.example".into()],
                ..Default::default()
            }),
            ErrorCode::InvalidArgument
        );
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
    }
}
