//! System V IPC ids (see resources/ipc.rs): a get call records the id it returns, every call
//! that takes an id translates it to the object's real id, which changes when a resume
//! recreates the object. Calls that take an index instead of an id (IPC_INFO, *_INFO,
//! *_STAT, *_STAT_ANY) pass through; what *_STAT returns is translated back.
//!
//! The blocking calls (msgsnd, msgrcv, semop, semtimedop) end with EINTR whenever a signal
//! handler runs, SA_RESTART or not: when the handler was our checkpoint's, the call is
//! continued — with the real id translated again, since the process may have been resumed
//! with new ids meanwhile (also when the call failed because the id it had used is gone).

use super::next::{call_real, real_fn};
use super::time::Deadline;
use super::{errno, set_errno};
use crate::resources::ipc::{self as table, Kind};
use crate::state::{self, INTERRUPTIONS};
use core::sync::atomic::Ordering;
use libc::{c_int, c_long, c_ulong, c_void, key_t, size_t, ssize_t, timespec};

real_fn!(SHMGET, b"shmget\0");
real_fn!(SHMAT, b"shmat\0");
real_fn!(SHMCTL, b"shmctl\0");
real_fn!(SEMGET, b"semget\0");
real_fn!(SEMOP, b"semop\0");
real_fn!(SEMTIMEDOP, b"semtimedop\0");
real_fn!(SEMCTL, b"semctl\0");
real_fn!(MSGGET, b"msgget\0");
real_fn!(MSGSND, b"msgsnd\0");
real_fn!(MSGRCV, b"msgrcv\0");
real_fn!(MSGCTL, b"msgctl\0");

pub fn resolve() {
    for r in [&SHMGET, &SHMAT, &SHMCTL, &SEMGET, &SEMOP, &SEMTIMEDOP, &SEMCTL, &MSGGET, &MSGSND, &MSGRCV, &MSGCTL] {
        r.get();
    }
}

// Commands whose "id" is an index into the kernel's table (glibc may add IPC_64, 0x100).
const IPC_INFO: c_int = 3;
const SHM_STAT: c_int = 13;
const SHM_INFO: c_int = 14;
const SHM_STAT_ANY: c_int = 15;
const MSG_STAT: c_int = 11;
const MSG_INFO: c_int = 12;
const MSG_STAT_ANY: c_int = 13;
const SEM_STAT: c_int = 18;
const SEM_INFO: c_int = 19;
const SEM_STAT_ANY: c_int = 20;

fn generation() -> u64 {
    INTERRUPTIONS.load(Ordering::Acquire)
}

/// Runs `call` with the real id behind `virt` until it returns anything but a failure caused
/// by a checkpoint: EINTR from our signal, or (after a resume between the translation and the
/// call) EINVAL/EIDRM for an id that no longer stands for the object. errno is left as the
/// program had it unless the call failed for the program.
fn with_id(kind: Kind, virt: c_int, mut call: impl FnMut(c_int) -> isize) -> isize {
    let saved = errno();
    loop {
        let gen = generation();
        let real = table::to_real(kind, virt);
        let r = call(real);
        if r == -1 && generation() != gen {
            let e = errno();
            let stale = (e == libc::EINVAL || e == libc::EIDRM) && table::to_real(kind, virt) != real;
            if e == libc::EINTR || stale {
                set_errno(saved);
                continue;
            }
        }
        return r;
    }
}

/// # Safety
/// shmget(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmget(key: key_t, size: size_t, flags: c_int) -> c_int {
    let real = call_real!(SHMGET: fn(key_t, size_t, c_int) -> c_int);
    // SAFETY: pass-through of the program's arguments.
    let r = unsafe { real(key, size, flags) };
    if r >= 0 {
        table::adopt(Kind::Shm, r)
    } else {
        r
    }
}

/// # Safety
/// shmat(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmat(id: c_int, addr: *const c_void, flags: c_int) -> *mut c_void {
    let real = call_real!(SHMAT: fn(c_int, *const c_void, c_int) -> *mut c_void);
    // SAFETY: pass-through of the program's arguments, the id translated.
    with_id(Kind::Shm, id, |r| unsafe { real(r, addr, flags) } as isize) as *mut c_void
}

/// # Safety
/// shmctl(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmctl(id: c_int, cmd: c_int, buf: *mut libc::shmid_ds) -> c_int {
    let real = call_real!(SHMCTL: fn(c_int, c_int, *mut libc::shmid_ds) -> c_int);
    match cmd & !0x100 {
        IPC_INFO | SHM_INFO => {
            // SAFETY: pass-through.
            unsafe { real(id, cmd, buf) }
        }
        SHM_STAT | SHM_STAT_ANY => {
            // SAFETY: pass-through (an index, not an id).
            let r = unsafe { real(id, cmd, buf) };
            if r >= 0 {
                stat_pids_shm(buf);
                table::to_virt(Kind::Shm, r).unwrap_or(r)
            } else {
                r
            }
        }
        c => {
            // SAFETY: pass-through, the id translated.
            let r = with_id(Kind::Shm, id, |r| unsafe { real(r, cmd, buf) } as isize) as c_int;
            // A removed segment stays usable while attached: its entry stays.
            if r == 0 && c == libc::IPC_STAT {
                stat_pids_shm(buf);
            }
            r
        }
    }
}

/// The pids in a segment's status, as the program sees pids.
fn stat_pids_shm(buf: *mut libc::shmid_ds) {
    if !buf.is_null() {
        // SAFETY: the kernel just filled the program's buffer.
        unsafe {
            (*buf).shm_cpid = state::to_virt((*buf).shm_cpid);
            (*buf).shm_lpid = state::to_virt((*buf).shm_lpid);
        }
    }
}

/// # Safety
/// semget(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn semget(key: key_t, nsems: c_int, flags: c_int) -> c_int {
    let real = call_real!(SEMGET: fn(key_t, c_int, c_int) -> c_int);
    // SAFETY: pass-through.
    let r = unsafe { real(key, nsems, flags) };
    if r >= 0 {
        table::adopt(Kind::Sem, r)
    } else {
        r
    }
}

/// # Safety
/// semop(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn semop(id: c_int, sops: *mut libc::sembuf, nsops: size_t) -> c_int {
    let real = call_real!(SEMOP: fn(c_int, *mut libc::sembuf, size_t) -> c_int);
    // SAFETY: pass-through, the id translated; an interrupted semop applied nothing.
    with_id(Kind::Sem, id, |r| unsafe { real(r, sops, nsops) } as isize) as c_int
}

/// # Safety
/// semtimedop(2)'s contract; the timeout is relative: a continuation waits what remained at
/// the freeze.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn semtimedop(
    id: c_int,
    sops: *mut libc::sembuf,
    nsops: size_t,
    timeout: *const timespec,
) -> c_int {
    let real = call_real!(SEMTIMEDOP: fn(c_int, *mut libc::sembuf, size_t, *const timespec) -> c_int);
    if timeout.is_null() {
        // SAFETY: pass-through, the id translated.
        return with_id(Kind::Sem, id, |r| unsafe { real(r, sops, nsops, timeout) } as isize) as c_int;
    }
    // SAFETY: the program's valid pointer.
    let mut deadline = Deadline::after_ts(unsafe { &*timeout });
    let mut first = true;
    with_id(Kind::Sem, id, |r| {
        if first {
            first = false;
            // SAFETY: pass-through with the program's own timeout.
            return unsafe { real(r, sops, nsops, timeout) } as isize;
        }
        deadline.continue_after_checkpoint();
        let left = deadline.remaining_ts();
        // SAFETY: the program's operations; a timeout of our own.
        unsafe { real(r, sops, nsops, &left) as isize }
    }) as c_int
}

/// semctl's fourth argument is a `union semun` passed by value, when the command uses it: an
/// integer register on x86_64 either way, taken here as a plain word and passed on.
///
/// # Safety
/// semctl(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn semctl(id: c_int, num: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let real = call_real!(SEMCTL: fn(c_int, c_int, c_int, c_ulong) -> c_int);
    match cmd & !0x100 {
        IPC_INFO | SEM_INFO => {
            // SAFETY: pass-through.
            unsafe { real(id, num, cmd, arg) }
        }
        SEM_STAT | SEM_STAT_ANY => {
            // SAFETY: pass-through (an index, not an id).
            let r = unsafe { real(id, num, cmd, arg) };
            if r >= 0 {
                table::to_virt(Kind::Sem, r).unwrap_or(r)
            } else {
                r
            }
        }
        c => {
            // SAFETY: pass-through, the id translated.
            let r = with_id(Kind::Sem, id, |r| unsafe { real(r, num, cmd, arg) } as isize) as c_int;
            if r == 0 && c == libc::IPC_RMID {
                table::forget(Kind::Sem, id);
            }
            if r > 0 && c == libc::GETPID {
                return state::to_virt(r);
            }
            r
        }
    }
}

/// # Safety
/// msgget(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn msgget(key: key_t, flags: c_int) -> c_int {
    let real = call_real!(MSGGET: fn(key_t, c_int) -> c_int);
    // SAFETY: pass-through.
    let r = unsafe { real(key, flags) };
    if r >= 0 {
        table::adopt(Kind::Msg, r)
    } else {
        r
    }
}

/// # Safety
/// msgsnd(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn msgsnd(id: c_int, msgp: *const c_void, size: size_t, flags: c_int) -> c_int {
    let real = call_real!(MSGSND: fn(c_int, *const c_void, size_t, c_int) -> c_int);
    // SAFETY: pass-through, the id translated; an interrupted msgsnd sent nothing.
    with_id(Kind::Msg, id, |r| unsafe { real(r, msgp, size, flags) } as isize) as c_int
}

/// # Safety
/// msgrcv(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn msgrcv(id: c_int, msgp: *mut c_void, size: size_t, msgtyp: c_long, flags: c_int) -> ssize_t {
    let real = call_real!(MSGRCV: fn(c_int, *mut c_void, size_t, c_long, c_int) -> ssize_t);
    // SAFETY: pass-through, the id translated; an interrupted msgrcv received nothing.
    with_id(Kind::Msg, id, |r| unsafe { real(r, msgp, size, msgtyp, flags) })
}

/// # Safety
/// msgctl(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn msgctl(id: c_int, cmd: c_int, buf: *mut libc::msqid_ds) -> c_int {
    let real = call_real!(MSGCTL: fn(c_int, c_int, *mut libc::msqid_ds) -> c_int);
    match cmd & !0x100 {
        IPC_INFO | MSG_INFO => {
            // SAFETY: pass-through.
            unsafe { real(id, cmd, buf) }
        }
        MSG_STAT | MSG_STAT_ANY => {
            // SAFETY: pass-through (an index, not an id).
            let r = unsafe { real(id, cmd, buf) };
            if r >= 0 {
                stat_pids_msg(buf);
                table::to_virt(Kind::Msg, r).unwrap_or(r)
            } else {
                r
            }
        }
        c => {
            // SAFETY: pass-through, the id translated.
            let r = with_id(Kind::Msg, id, |r| unsafe { real(r, cmd, buf) } as isize) as c_int;
            if r == 0 && c == libc::IPC_RMID {
                table::forget(Kind::Msg, id);
            }
            if r == 0 && c == libc::IPC_STAT {
                stat_pids_msg(buf);
            }
            r
        }
    }
}

/// The pids in a queue's status, as the program sees pids.
fn stat_pids_msg(buf: *mut libc::msqid_ds) {
    if !buf.is_null() {
        // SAFETY: the kernel just filled the program's buffer.
        unsafe {
            (*buf).msg_lspid = state::to_virt((*buf).msg_lspid);
            (*buf).msg_lrpid = state::to_virt((*buf).msg_lrpid);
        }
    }
}

/// The same calls made through syscall(2) (see hooks/pids.rs): `Some(result)` for the System V
/// numbers.
pub fn via_syscall(nr: c_long, a: [c_long; 6]) -> Option<c_long> {
    // SAFETY: each arm passes the program's own arguments to the hook of the same call.
    let r = unsafe {
        match nr {
            libc::SYS_shmget => shmget(a[0] as key_t, a[1] as size_t, a[2] as c_int) as c_long,
            libc::SYS_shmat => shmat(a[0] as c_int, a[1] as *const c_void, a[2] as c_int) as c_long,
            libc::SYS_shmctl => shmctl(a[0] as c_int, a[1] as c_int, a[2] as *mut libc::shmid_ds) as c_long,
            libc::SYS_semget => semget(a[0] as key_t, a[1] as c_int, a[2] as c_int) as c_long,
            libc::SYS_semop => semop(a[0] as c_int, a[1] as *mut libc::sembuf, a[2] as size_t) as c_long,
            libc::SYS_semtimedop => {
                semtimedop(a[0] as c_int, a[1] as *mut libc::sembuf, a[2] as size_t, a[3] as *const timespec) as c_long
            }
            libc::SYS_semctl => semctl(a[0] as c_int, a[1] as c_int, a[2] as c_int, a[3] as c_ulong) as c_long,
            libc::SYS_msgget => msgget(a[0] as key_t, a[1] as c_int) as c_long,
            libc::SYS_msgsnd => msgsnd(a[0] as c_int, a[1] as *const c_void, a[2] as size_t, a[3] as c_int) as c_long,
            libc::SYS_msgrcv => {
                msgrcv(a[0] as c_int, a[1] as *mut c_void, a[2] as size_t, a[3] as c_long, a[4] as c_int) as c_long
            }
            libc::SYS_msgctl => msgctl(a[0] as c_int, a[1] as c_int, a[2] as *mut libc::msqid_ds) as c_long,
            _ => return None,
        }
    };
    Some(r)
}
