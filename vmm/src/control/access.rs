//! Who may use the control socket: `--allow-user`/`--allow-group` resolved to ids, and the
//! `SO_PEERCRED` check of every connecting peer.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// Errors resolving the access configuration.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// No such user (and not a numeric uid).
    #[error("unknown user '{0}' in --allow-user")]
    UnknownUser(String),
    /// No such group (and not a numeric gid).
    #[error("unknown group '{0}' in --allow-group")]
    UnknownGroup(String),
    /// The name contains a NUL byte.
    #[error("invalid name '{0}'")]
    InvalidName(String),
    /// The user/group database could not be read.
    #[error("cannot look up '{name}': {source}")]
    Lookup {
        /// The name.
        name: String,
        /// The error from the name service.
        source: io::Error,
    },
}

/// Who may connect: root and the VMM's own uid always; plus the listed uids, and every user
/// whose primary or supplementary group is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// The VMM's effective uid (the operator).
    pub owner_uid: u32,
    /// `--allow-user`, resolved.
    pub uids: Vec<u32>,
    /// `--allow-group`, resolved.
    pub gids: Vec<u32>,
    /// Group given to the socket and its directory: the first allowed group, else the primary
    /// group of the first allowed user, else none (left as created).
    pub socket_gid: Option<u32>,
}

impl AccessPolicy {
    /// Only root and `owner_uid`.
    pub fn owner_only(owner_uid: u32) -> Self {
        AccessPolicy {
            owner_uid,
            uids: Vec::new(),
            gids: Vec::new(),
            socket_gid: None,
        }
    }

    /// Resolves user and group names (numeric ids are accepted too) through the system's user
    /// database; the owner is the VMM's effective uid.
    pub fn resolve(users: &[String], groups: &[String]) -> Result<Self, AccessError> {
        // SAFETY: geteuid has no failure modes.
        let owner_uid = unsafe { libc::geteuid() };
        let mut uids = Vec::new();
        let mut first_user_gid = None;
        for name in users {
            let user = lookup_user(name)?.ok_or_else(|| AccessError::UnknownUser(name.clone()));
            let (uid, gid) = match user {
                Ok(u) => (u.uid, Some(u.gid)),
                Err(e) => match name.parse::<u32>() {
                    Ok(uid) => (uid, None),
                    Err(_) => return Err(e),
                },
            };
            if first_user_gid.is_none() {
                first_user_gid = gid;
            }
            if !uids.contains(&uid) {
                uids.push(uid);
            }
        }
        let mut gids = Vec::new();
        for name in groups {
            let gid = match lookup_group(name)? {
                Some(gid) => gid,
                None => name
                    .parse::<u32>()
                    .map_err(|_| AccessError::UnknownGroup(name.clone()))?,
            };
            if !gids.contains(&gid) {
                gids.push(gid);
            }
        }
        let socket_gid = gids.first().copied().or(first_user_gid);
        Ok(AccessPolicy {
            owner_uid,
            uids,
            gids,
            socket_gid,
        })
    }
}

/// The credentials of a connected peer, with its supplementary groups when they were needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Process id at connect time.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups of the user in the group database (`getgrouplist`).
    pub groups: Vec<u32>,
    /// Root or the VMM's owner (see [`is_operator`]): may back up the VM, not only run it.
    pub operator: bool,
}

impl PeerIdentity {
    /// Refuses `cmd` (`forbidden`) to anyone but the operator: requests
    /// that copy the VM's disks or memory out, or move it.
    pub fn require_operator(&self, cmd: &str) -> Result<(), protocol::ControlError> {
        if self.operator {
            return Ok(());
        }
        Err(protocol::ControlError::new(
            protocol::ErrorCode::Forbidden,
            format!("permission denied: {cmd} is the host operator's (root or the VMM's owner)"),
        ))
    }

    /// Reads `SO_PEERCRED` of a connected stream. Supplementary groups are looked up only when
    /// the policy could admit the peer through them and nothing else admits it.
    pub fn of(stream: &UnixStream, policy: &AccessPolicy) -> io::Result<Self> {
        let cred = peer_cred(stream)?;
        let mut peer = PeerIdentity {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
            groups: Vec::new(),
            operator: false,
        };
        peer.operator = is_operator(&peer, policy);
        if !policy.gids.is_empty() && !is_allowed(&peer, policy) {
            // The groups the connecting process holds (SO_PEERGROUPS, as
            // the kernel recorded them at connect), not the user database's:
            // no file to read, so a confined VMM (sandbox.rs) needs none, and
            // a `usermod -aG` takes effect at the customer's next login, as
            // for every other file they reach.
            peer.groups = peer_groups(stream)?;
        }
        Ok(peer)
    }
}

/// `SO_PEERGROUPS` of a Unix stream socket: the peer's supplementary groups.
pub fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which is that large.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n.min(groups.len()));
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: `len` now says how much room it needs (at most NGROUPS_MAX).
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > 65_536 {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

/// The access decision, a pure function: root, the VMM's owner, an allowed uid, or a member
/// (primary or supplementary) of an allowed group.
pub fn is_allowed(peer: &PeerIdentity, policy: &AccessPolicy) -> bool {
    peer.uid == 0
        || peer.uid == policy.owner_uid
        || policy.uids.contains(&peer.uid)
        || policy.gids.contains(&peer.gid)
        || peer.groups.iter().any(|g| policy.gids.contains(g))
}

/// The operator's requests (`backup`) are for root and the VMM's owner only: the users and
/// groups of `--allow-user`/`--allow-group` are the VM's customers, who run their machine but
/// do not copy its disks out of it.
pub fn is_operator(peer: &PeerIdentity, policy: &AccessPolicy) -> bool {
    peer.uid == 0 || peer.uid == policy.owner_uid
}

/// `SO_PEERCRED` of a Unix stream socket.
pub fn peer_cred(stream: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

pub(crate) struct User {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) name: CString,
}

/// Runs a reentrant name-service lookup with a growing buffer.
fn with_buffer<T>(
    name: &str,
    mut f: impl FnMut(&mut Vec<libc::c_char>) -> Result<Option<T>, i32>,
) -> Result<Option<T>, AccessError> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        match f(&mut buf) {
            Ok(v) => return Ok(v),
            Err(libc::ERANGE) if buf.len() < (1 << 20) => {
                let n = buf.len() * 4;
                buf.resize(n, 0);
            }
            // "Not found" is reported differently by different NSS modules.
            Err(libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM) => return Ok(None),
            Err(errno) => {
                return Err(AccessError::Lookup {
                    name: name.to_string(),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }
}

fn passwd_result(
    rc: i32,
    result: *mut libc::passwd,
    pwd: &libc::passwd,
) -> Result<Option<User>, i32> {
    if rc != 0 {
        return Err(rc);
    }
    if result.is_null() {
        return Ok(None);
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside our buffer.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned();
    Ok(Some(User {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        name,
    }))
}

pub(crate) fn lookup_user(name: &str) -> Result<Option<User>, AccessError> {
    let cname = CString::new(name).map_err(|_| AccessError::InvalidName(name.to_string()))?;
    with_buffer(name, |buf| {
        // SAFETY: passwd is plain data filled by getpwnam_r.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; strings in `pwd` point into `buf`.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        passwd_result(rc, result, &pwd)
    })
}

fn lookup_uid(uid: u32) -> Result<Option<User>, AccessError> {
    with_buffer(&uid.to_string(), |buf| {
        // SAFETY: passwd is plain data filled by getpwuid_r.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; strings in `pwd` point into `buf`.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        passwd_result(rc, result, &pwd)
    })
}

fn lookup_group(name: &str) -> Result<Option<u32>, AccessError> {
    let cname = CString::new(name).map_err(|_| AccessError::InvalidName(name.to_string()))?;
    with_buffer(name, |buf| {
        // SAFETY: group is plain data filled by getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; strings in `grp` point into `buf`.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        Ok((!result.is_null()).then_some(grp.gr_gid))
    })
}

/// The groups of `uid` in the group database (`getgrouplist`), its primary group included.
pub fn supplementary_groups(uid: u32, primary_gid: u32) -> Result<Vec<u32>, AccessError> {
    let Some(user) = lookup_uid(uid)? else {
        return Ok(Vec::new());
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `n` entries; getgrouplist writes at most `n` and updates it.
        let rc = unsafe {
            libc::getgrouplist(user.name.as_ptr(), primary_gid, groups.as_mut_ptr(), &mut n)
        };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return Ok(groups);
        }
        if groups.len() >= 65_536 {
            return Ok(groups);
        }
        let want = (n.max(0) as usize).max(groups.len() * 2);
        groups.resize(want, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerIdentity {
        PeerIdentity {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
            operator: uid == 0,
        }
    }

    fn policy() -> AccessPolicy {
        AccessPolicy {
            owner_uid: 1000,
            uids: vec![2001],
            gids: vec![3001, 3002],
            socket_gid: Some(3001),
        }
    }

    #[test]
    fn root_and_owner_are_always_allowed() {
        let p = AccessPolicy::owner_only(1000);
        assert!(is_allowed(&peer(0, 0, &[]), &p));
        assert!(is_allowed(&peer(1000, 5, &[]), &p));
        assert!(!is_allowed(&peer(1001, 1000, &[1000]), &p));
    }

    #[test]
    fn allowed_uid_primary_gid_or_supplementary_group_admits() {
        let p = policy();
        assert!(is_allowed(&peer(2001, 9, &[]), &p), "listed user");
        assert!(is_allowed(&peer(4000, 3002, &[]), &p), "primary group");
        assert!(
            is_allowed(&peer(4000, 9, &[7, 3001]), &p),
            "supplementary group"
        );
    }

    #[test]
    fn everyone_else_is_refused() {
        let p = policy();
        assert!(!is_allowed(&peer(65534, 65534, &[65534]), &p));
        assert!(
            !is_allowed(&peer(2002, 3003, &[1000, 2001]), &p),
            "ids are not mixed up"
        );
        assert!(!is_allowed(
            &peer(1001, 0, &[]),
            &AccessPolicy::owner_only(1000)
        ));
    }

    #[test]
    fn names_and_numbers_resolve() {
        let p = AccessPolicy::resolve(&["root".into(), "4242".into()], &["0".into()]).unwrap();
        assert_eq!(p.uids, vec![0, 4242]);
        assert_eq!(p.gids, vec![0]);
        assert_eq!(p.socket_gid, Some(0));
        let p = AccessPolicy::resolve(&["root".into()], &[]).unwrap();
        assert_eq!(p.socket_gid, Some(0), "primary group of the first user");
        let p = AccessPolicy::resolve(&[], &[]).unwrap();
        assert_eq!(p.socket_gid, None);
    }

    #[test]
    fn unknown_names_are_clear_config_errors() {
        let e = AccessPolicy::resolve(&["no-such-user-xyz".into()], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown user 'no-such-user-xyz' in --allow-user"
        );
        let e = AccessPolicy::resolve(&[], &["no-such-group-xyz".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown group 'no-such-group-xyz' in --allow-group"
        );
        let e = AccessPolicy::resolve(&["a\0b".into()], &[]).unwrap_err();
        assert_eq!(e.to_string(), "invalid name 'a\0b'");
    }

    #[test]
    fn supplementary_groups_include_the_primary_group() {
        let groups = supplementary_groups(0, 0).unwrap();
        assert!(groups.contains(&0), "{groups:?}");
        assert!(supplementary_groups(4_000_000_000, 1).unwrap().is_empty());
    }

    #[test]
    fn a_peers_groups_are_the_supplementary_groups_its_process_holds() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut ours: Vec<libc::gid_t> = vec![0; 1024];
        // SAFETY: `ours` has room for 1024 entries.
        let n = unsafe { libc::getgroups(1024, ours.as_mut_ptr()) };
        ours.truncate(n.max(0) as usize);
        let mut theirs = peer_groups(&a).unwrap();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(theirs, ours);
    }

    #[test]
    fn peer_credentials_of_a_socketpair_are_our_own() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = PeerIdentity::of(&a, &AccessPolicy::owner_only(0)).unwrap();
        // SAFETY: trivial getters.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((p.uid, p.gid, p.pid), (uid, gid, std::process::id() as i32));
    }
}
