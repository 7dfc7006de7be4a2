//! Principals (users with argon2 password hashes) and access-control lists,
//! kept in the store so they survive restarts and replicate with the rest.
//!
//! An ACL entry grants a principal permissions on a destination pattern:
//! `r` (consume: SUBSCRIBE), `w` (produce: SEND) and `a` (administer: manage
//! users and ACLs through the admin port; implies `r` and `w`). Patterns use
//! ActiveMQ's wildcards over dot-separated names: `*` matches one segment,
//! `>` matches one or more trailing segments. A pattern may start with
//! `/queue/` or `/topic/` to apply to one kind only; `>` alone matches every
//! destination. The principal `*` stands for every authenticated user.

use std::collections::BTreeMap;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use fmq_store::{Batch, Cf, Store};
use parking_lot::RwLock;

use crate::destination::Destination;
use crate::error::{Error, Result};

/// What a principal may do on a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Consume (SUBSCRIBE).
    Read,
    /// Produce (SEND).
    Write,
    /// Administer users and ACLs.
    Admin,
}

impl Permission {
    fn letter(self) -> char {
        match self {
            Permission::Read => 'r',
            Permission::Write => 'w',
            Permission::Admin => 'a',
        }
    }

    /// The verb used in error messages.
    pub fn verb(self) -> &'static str {
        match self {
            Permission::Read => "read from",
            Permission::Write => "write to",
            Permission::Admin => "administer",
        }
    }
}

/// One ACL entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    /// User name, or `*` for every authenticated user.
    pub principal: String,
    /// Destination pattern.
    pub pattern: String,
    /// Any of `r`, `w`, `a`.
    pub permissions: String,
}

#[derive(Debug, Default)]
struct State {
    users: BTreeMap<String, String>,
    acls: BTreeMap<(String, String), String>,
}

/// Users and ACLs. Cheap to share (`Arc`).
pub struct Security {
    store: Arc<dyn Store>,
    enabled: bool,
    state: RwLock<State>,
    /// Password checks running at once. Each argon2 verification holds
    /// about 19 MiB and a core for tens of milliseconds; after a failover
    /// every client logs in again at the same moment, and without a bound
    /// that storm took one broker to gigabytes of memory.
    verifications: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

fn acl_key(principal: &str, pattern: &str) -> Vec<u8> {
    let mut k = principal.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(pattern.as_bytes());
    k
}

impl Security {
    /// Loads users and ACLs from the store. With `enabled` false every
    /// connection is accepted and every operation allowed.
    pub fn load(store: Arc<dyn Store>, enabled: bool) -> Result<Security> {
        let mut state = State::default();
        store.scan_prefix(Cf::Principals, b"", &mut |k, v| {
            let name = String::from_utf8_lossy(k).into_owned();
            state
                .users
                .insert(name, String::from_utf8_lossy(v).into_owned());
            Ok(())
        })?;
        store.scan_prefix(Cf::Acls, b"", &mut |k, v| {
            let text = String::from_utf8_lossy(k);
            if let Some((principal, pattern)) = text.split_once('\0') {
                state.acls.insert(
                    (principal.to_owned(), pattern.to_owned()),
                    String::from_utf8_lossy(v).into_owned(),
                );
            }
            Ok(())
        })?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(Security {
            store,
            enabled,
            state: RwLock::new(state),
            verifications: Arc::new(tokio::sync::Semaphore::new(cores)),
        })
    }

    /// Whether authentication and authorization are on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// On a store with no users, creates `user` with `password` and the
    /// admin permission on every destination. Returns true if it did.
    pub async fn bootstrap(&self, user: &str, password: &str) -> Result<bool> {
        if !self.state.read().users.is_empty() {
            return Ok(false);
        }
        self.add_user(user, password).await?;
        self.grant(user, ">", "rwa").await?;
        Ok(true)
    }

    /// Checks a login off the async workers, at most one check per core at
    /// a time (the others wait their turn): [`Security::authenticate`] for
    /// async callers. The error is the text for the client.
    pub async fn login(
        self: &Arc<Self>,
        login: Option<String>,
        passcode: Option<String>,
    ) -> Result<String, String> {
        if !self.enabled {
            return self.authenticate(login.as_deref(), passcode.as_deref());
        }
        let permit = self
            .verifications
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "authentication failed: the server is stopping".to_owned())?;
        let security = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            security.authenticate(login.as_deref(), passcode.as_deref())
        })
        .await
        .map_err(|e| format!("authentication failed: {e}"))?
    }

    /// Checks a login. CPU-heavy by design (argon2): async code calls
    /// [`Security::login`] instead, which runs it off the async workers
    /// with a bound on how many run at once. The error is the text for the
    /// client.
    pub fn authenticate(
        &self,
        login: Option<&str>,
        passcode: Option<&str>,
    ) -> Result<String, String> {
        if !self.enabled {
            return Ok(login.unwrap_or("anonymous").to_owned());
        }
        let login = login
            .ok_or_else(|| "authentication required: CONNECT has no login header".to_owned())?;
        let hash = self.state.read().users.get(login).cloned();
        // Verify against a fixed hash for unknown users too, so timing does
        // not reveal which user names exist.
        let stored = hash.unwrap_or_else(|| DUMMY_HASH.to_owned());
        let parsed = PasswordHash::new(&stored).map_err(|_| "authentication failed".to_owned())?;
        let ok = Argon2::default()
            .verify_password(passcode.unwrap_or("").as_bytes(), &parsed)
            .is_ok();
        if ok && self.state.read().users.contains_key(login) {
            Ok(login.to_owned())
        } else {
            Err(format!(
                "authentication failed for user '{login}': wrong user name or password"
            ))
        }
    }

    /// Whether `principal` may `perm` on `dest`.
    pub fn authorize(&self, principal: &str, dest: &Destination, perm: Permission) -> bool {
        if !self.enabled {
            return true;
        }
        let text = dest.to_string();
        let state = self.state.read();
        state.acls.iter().any(|((p, pattern), perms)| {
            (p == principal || p == "*")
                && (perms.contains(perm.letter()) || perms.contains('a'))
                && pattern_matches(pattern, &text)
        })
    }

    /// Whether `principal` holds the admin permission on every destination.
    pub fn is_admin(&self, principal: &str) -> bool {
        if !self.enabled {
            return true;
        }
        let state = self.state.read();
        state
            .acls
            .iter()
            .any(|((p, pattern), perms)| p == principal && pattern == ">" && perms.contains('a'))
    }

    /// Adds a user; fails if the name is taken or invalid.
    pub async fn add_user(&self, name: &str, password: &str) -> Result<()> {
        validate_name(name)?;
        if self.state.read().users.contains_key(name) {
            return Err(Error::Security(format!("user '{name}' already exists")));
        }
        self.put_user(name, password).await
    }

    /// Changes a user's password.
    pub async fn set_password(&self, name: &str, password: &str) -> Result<()> {
        if !self.state.read().users.contains_key(name) {
            return Err(Error::Security(format!("no user '{name}'")));
        }
        self.put_user(name, password).await
    }

    async fn put_user(&self, name: &str, password: &str) -> Result<()> {
        if password.is_empty() {
            return Err(Error::Security("password must not be empty".into()));
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| Error::Security(format!("cannot hash password: {e}")))?
            .to_string();
        let mut batch = Batch::new();
        batch.put(
            Cf::Principals,
            name.as_bytes().to_vec(),
            hash.as_bytes().to_vec(),
        );
        batch.set_sync(true);
        self.store.commit(batch).await?;
        self.state.write().users.insert(name.to_owned(), hash);
        Ok(())
    }

    /// Removes a user and every ACL entry naming it.
    pub async fn remove_user(&self, name: &str) -> Result<()> {
        let acls: Vec<String> = {
            let state = self.state.read();
            if !state.users.contains_key(name) {
                return Err(Error::Security(format!("no user '{name}'")));
            }
            state
                .acls
                .keys()
                .filter(|(p, _)| p == name)
                .map(|(_, pat)| pat.clone())
                .collect()
        };
        let mut batch = Batch::new();
        batch.delete(Cf::Principals, name.as_bytes().to_vec());
        for pattern in &acls {
            batch.delete(Cf::Acls, acl_key(name, pattern));
        }
        batch.set_sync(true);
        self.store.commit(batch).await?;
        let mut state = self.state.write();
        state.users.remove(name);
        for pattern in acls {
            state.acls.remove(&(name.to_owned(), pattern));
        }
        Ok(())
    }

    /// Grants `permissions` (letters from `rwa`) on `pattern`, adding to what
    /// the principal already has there.
    pub async fn grant(&self, principal: &str, pattern: &str, permissions: &str) -> Result<()> {
        validate_pattern(pattern)?;
        let perms = normalize_perms(permissions)?;
        if principal != "*" && !self.state.read().users.contains_key(principal) {
            return Err(Error::Security(format!("no user '{principal}'")));
        }
        let key = (principal.to_owned(), pattern.to_owned());
        let merged = {
            let state = self.state.read();
            let old = state.acls.get(&key).cloned().unwrap_or_default();
            normalize_perms(&format!("{old}{perms}"))?
        };
        self.put_acl(key, merged).await
    }

    /// Revokes `permissions` on `pattern`; an entry left with none is removed.
    pub async fn revoke(&self, principal: &str, pattern: &str, permissions: &str) -> Result<()> {
        let perms = normalize_perms(permissions)?;
        let key = (principal.to_owned(), pattern.to_owned());
        let left: String = {
            let state = self.state.read();
            let old = state.acls.get(&key).ok_or_else(|| {
                Error::Security(format!("no ACL entry for '{principal}' on '{pattern}'"))
            })?;
            old.chars().filter(|c| !perms.contains(*c)).collect()
        };
        self.put_acl(key, left).await
    }

    async fn put_acl(&self, key: (String, String), perms: String) -> Result<()> {
        let mut batch = Batch::new();
        let k = acl_key(&key.0, &key.1);
        if perms.is_empty() {
            batch.delete(Cf::Acls, k);
        } else {
            batch.put(Cf::Acls, k, perms.as_bytes().to_vec());
        }
        batch.set_sync(true);
        self.store.commit(batch).await?;
        let mut state = self.state.write();
        if perms.is_empty() {
            state.acls.remove(&key);
        } else {
            state.acls.insert(key, perms);
        }
        Ok(())
    }

    /// User names.
    pub fn users(&self) -> Vec<String> {
        self.state.read().users.keys().cloned().collect()
    }

    /// ACL entries.
    pub fn acls(&self) -> Vec<AclEntry> {
        self.state
            .read()
            .acls
            .iter()
            .map(|((principal, pattern), permissions)| AclEntry {
                principal: principal.clone(),
                pattern: pattern.clone(),
                permissions: permissions.clone(),
            })
            .collect()
    }
}

/// A valid argon2 hash of a random string, verified against when the user is
/// unknown so that a failed login costs the same either way.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0Dn3pFM8V0jmsdp5YUdp3X3Y1Zg9a0s2d5sUq6mKZ2w";

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 || name == "*" {
        return Err(Error::Security(format!(
            "user name '{name}' must be 1 to 128 characters and not '*'"
        )));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == ':' || c.is_whitespace())
    {
        return Err(Error::Security(format!(
            "user name '{}' must not contain spaces, ':' or control characters",
            name.escape_debug()
        )));
    }
    Ok(())
}

fn validate_pattern(pattern: &str) -> Result<()> {
    let body = pattern
        .strip_prefix("/queue/")
        .or_else(|| pattern.strip_prefix("/topic/"))
        .unwrap_or(pattern);
    if body.is_empty() || body.starts_with('/') || pattern.chars().any(|c| c.is_control()) {
        return Err(Error::Security(format!(
            "ACL pattern '{pattern}' must be '>', NAME.WITH.*.OR.>, or /queue/... or /topic/..."
        )));
    }
    if let Some(pos) = body.find('>') {
        if pos + 1 != body.len() || !(pos == 0 || body[..pos].ends_with('.')) {
            return Err(Error::Security(format!(
                "ACL pattern '{pattern}': '>' may only stand as the last segment"
            )));
        }
    }
    Ok(())
}

fn normalize_perms(perms: &str) -> Result<String> {
    if let Some(bad) = perms.chars().find(|c| !"rwa".contains(*c)) {
        return Err(Error::Security(format!(
            "permission '{bad}' is not one of r (read), w (write), a (admin)"
        )));
    }
    Ok("rwa".chars().filter(|c| perms.contains(*c)).collect())
}

/// Matches a destination (`/queue/a.b`) against an ACL pattern.
pub fn pattern_matches(pattern: &str, destination: &str) -> bool {
    let (dest_kind, dest_name) = match destination.split_at_checked(7) {
        Some((k, n)) if k == "/queue/" || k == "/topic/" => (k, n),
        _ => return false,
    };
    let pat_name = if let Some(rest) = pattern.strip_prefix(dest_kind) {
        rest
    } else if pattern.starts_with("/queue/") || pattern.starts_with("/topic/") {
        return false;
    } else {
        pattern
    };
    let mut pat = pat_name.split('.');
    let mut name = dest_name.split('.');
    loop {
        match (pat.next(), name.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => continue,
            (Some(p), Some(n)) if p == n => continue,
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fmq_store::MemoryStore;
    use std::time::Duration;

    #[test]
    fn wildcard_patterns() {
        assert!(pattern_matches(">", "/queue/a"));
        assert!(pattern_matches(">", "/topic/a.b"));
        assert!(pattern_matches("/queue/>", "/queue/a.b"));
        assert!(!pattern_matches("/queue/>", "/topic/a"));
        assert!(pattern_matches("orders.*", "/queue/orders.eu"));
        assert!(!pattern_matches("orders.*", "/queue/orders.eu.x"));
        assert!(pattern_matches("orders.>", "/topic/orders.eu.x"));
        assert!(!pattern_matches("orders.>", "/topic/orders"));
        assert!(pattern_matches("/topic/a", "/topic/a"));
        assert!(!pattern_matches("/topic/a", "/topic/ab"));
    }

    #[tokio::test]
    async fn logins_wait_for_a_verification_slot() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let sec = Arc::new(Security::load(store, true).expect("load"));
        sec.add_user("bob", "secret").await.expect("add");
        // Every slot taken, as by a storm of logins after a failover.
        let slots = sec.verifications.available_permits();
        let held = sec
            .verifications
            .clone()
            .acquire_many_owned(u32::try_from(slots).expect("slots"))
            .await
            .expect("permits");
        let login = tokio::spawn({
            let sec = sec.clone();
            async move { sec.login(Some("bob".into()), Some("secret".into())).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!login.is_finished(), "a login ran without a free slot");
        drop(held);
        assert_eq!(login.await.expect("join"), Ok("bob".to_owned()));
        let wrong = sec.login(Some("bob".into()), Some("nope".into())).await;
        assert!(wrong.is_err_and(|e| e.contains("wrong user name or password")));
        assert_eq!(sec.verifications.available_permits(), slots);
    }

    #[test]
    fn dummy_hash_parses() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[tokio::test]
    async fn users_and_acls_round_trip_through_the_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let sec = Security::load(store.clone(), true).expect("load");
        assert!(sec.bootstrap("admin", "passwd").await.expect("bootstrap"));
        assert!(!sec.bootstrap("admin", "passwd").await.expect("again"));
        sec.add_user("bob", "secret").await.expect("add");
        sec.grant("bob", "/queue/orders.>", "w")
            .await
            .expect("grant");
        let reloaded = Security::load(store, true).expect("reload");
        assert_eq!(
            reloaded.authenticate(Some("bob"), Some("secret")),
            Ok("bob".into())
        );
        let err = reloaded
            .authenticate(Some("bob"), Some("wrong"))
            .expect_err("wrong password");
        assert!(err.contains("authentication failed"), "{err}");
        assert!(reloaded.authenticate(Some("nobody"), Some("x")).is_err());
        let orders = Destination::parse("/queue/orders.eu").expect("dest");
        assert!(reloaded.authorize("bob", &orders, Permission::Write));
        assert!(!reloaded.authorize("bob", &orders, Permission::Read));
        assert!(reloaded.authorize("admin", &orders, Permission::Read));
        assert!(reloaded.is_admin("admin"));
        assert!(!reloaded.is_admin("bob"));
        reloaded
            .revoke("bob", "/queue/orders.>", "w")
            .await
            .expect("revoke");
        assert!(!reloaded.authorize("bob", &orders, Permission::Write));
        reloaded.remove_user("bob").await.expect("remove");
        assert!(reloaded.authenticate(Some("bob"), Some("secret")).is_err());
    }

    #[tokio::test]
    async fn bad_input_is_named() {
        let sec = Security::load(Arc::new(MemoryStore::new()), true).expect("load");
        let e = sec.grant("ghost", ">", "r").await.expect_err("no user");
        assert!(e.to_string().contains("no user 'ghost'"));
        sec.add_user("u", "p").await.expect("add");
        let e = sec.grant("u", ">", "rx").await.expect_err("bad perm");
        assert!(e.to_string().contains("'x'"));
        let e = sec.grant("u", "a.>.b", "r").await.expect_err("bad pattern");
        assert!(e.to_string().contains("last segment"));
        let e = sec.add_user("u", "p").await.expect_err("dup");
        assert!(e.to_string().contains("already exists"));
    }
}
