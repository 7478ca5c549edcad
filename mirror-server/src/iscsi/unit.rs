//! A logical unit as its initiators share it (SPC-4): the medium, a
//! [`Lun`], and what the unit keeps between commands for every I_T nexus
//! — persistent reservations (PERSISTENT RESERVE IN/OUT), a RESERVE(6)
//! holder, the software write protect bit (MODE SELECT, control page), and
//! the unit attentions each nexus has yet to hear.
//!
//! Sans-IO like [`super::scsi`]: the target hands each command in
//! with the [`Nexus`] it came from; the medium commands themselves run in
//! `scsi`, through a view of the unit that is read-only while SWP is set.
//!
//! Reservations live as long as the export: they are not kept across a
//! restart (PTPL_C = 0, APTPL refused), which REPORT CAPABILITIES says.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::scsi::{self, be16, be32, be64, Lun, Needs, Outcome, Sense};

/// An I_T nexus: one initiator port (its name and the session's ISID)
/// on this target's one port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The session's initiator session ID.
    pub isid: [u8; 6],
}

impl Nexus {
    /// The nexus of `initiator`'s session `isid`.
    pub fn new(initiator: &str, isid: [u8; 6]) -> Nexus {
        Nexus {
            initiator: initiator.to_string(),
            isid,
        }
    }

    /// Its iSCSI TransportID (SPC-4 §7.6.4.6, format 01b: the initiator
    /// port name, "NAME,i,0xISID"), padded to a multiple of 4 bytes.
    fn transport_id(&self) -> Vec<u8> {
        let mut name = format!("{},i,0x", self.initiator);
        for b in self.isid {
            name.push_str(&format!("{b:02x}"));
        }
        let mut text = name.into_bytes();
        text.push(0);
        while text.len() % 4 != 0 {
            text.push(0);
        }
        let mut id = vec![0x40 | 0x05, 0];
        id.extend_from_slice(&(text.len() as u16).to_be_bytes());
        id.extend(text);
        id
    }
}

/// UNIT ATTENTION / MODE PARAMETERS CHANGED.
const MODE_CHANGED: Sense = Sense::new(0x06, 0x2a, 0x01);
/// UNIT ATTENTION / RESERVATIONS PREEMPTED.
const PREEMPTED: Sense = Sense::new(0x06, 0x2a, 0x03);
/// UNIT ATTENTION / RESERVATIONS RELEASED.
const RELEASED: Sense = Sense::new(0x06, 0x2a, 0x04);
/// UNIT ATTENTION / REGISTRATIONS PREEMPTED.
const REGISTRATIONS_PREEMPTED: Sense = Sense::new(0x06, 0x2a, 0x05);
/// ILLEGAL REQUEST / INSUFFICIENT REGISTRATION RESOURCES.
const NO_REGISTRATION_ROOM: Sense = Sense::new(0x05, 0x55, 0x04);
/// ILLEGAL REQUEST / INVALID RELEASE OF PERSISTENT RESERVATION.
const INVALID_RELEASE: Sense = Sense::new(0x05, 0x26, 0x04);

/// Persistent reservation types (SPC-4 table 191).
mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

    /// Whether `t` is a type this unit takes.
    pub fn valid(t: u8) -> bool {
        matches!(
            t,
            WRITE_EXCLUSIVE | EXCLUSIVE_ACCESS | WRITE_EXCLUSIVE_REGISTRANTS_ONLY
                ..=EXCLUSIVE_ACCESS_ALL_REGISTRANTS
        )
    }

    /// Registrants-only and all-registrants types: every registrant may
    /// access, and (all-registrants) every registrant holds it.
    pub fn for_registrants(t: u8) -> bool {
        t >= WRITE_EXCLUSIVE_REGISTRANTS_ONLY
    }

    /// All-registrants types: every registrant is a holder.
    pub fn all_registrants(t: u8) -> bool {
        t >= WRITE_EXCLUSIVE_ALL_REGISTRANTS
    }

    /// Types that keep others from reading too.
    pub fn exclusive_access(t: u8) -> bool {
        matches!(
            t,
            EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
        )
    }
}

/// A persistent reservation.
#[derive(Debug, Clone)]
struct Reservation {
    /// Who made it (for all-registrants types: every registrant holds it).
    holder: Nexus,
    kind: u8,
}

#[derive(Debug, Default)]
struct State {
    /// PRgeneration: bumped by every registration change.
    generation: u32,
    /// Registered nexuses and their keys, in registration order.
    registrations: Vec<(Nexus, u64)>,
    reservation: Option<Reservation>,
    /// RESERVE(6)'s holder.
    reserved: Option<Nexus>,
    /// Software write protect (control mode page).
    swp: bool,
    /// The unit attentions each nexus is owed: every nexus with a
    /// session now, and registered ones without (they hear what happened
    /// to their registration when they come back), up to
    /// [`MAX_ABSENT_ATTENTIONS`] absent ones.
    attentions: HashMap<Nexus, VecDeque<Sense>>,
    /// Nexuses with a session now.
    attached: std::collections::HashSet<Nexus>,
}

impl State {
    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|(_, k)| *k)
    }

    fn holds(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(r) if kind::all_registrants(r.kind) => self.key_of(nexus).is_some(),
            Some(r) => r.holder == *nexus,
            None => false,
        }
    }

    /// Owe `sense` to the nexuses `to` picks (of those attentions are
    /// kept for: see `attentions`).
    fn tell(&mut self, sense: Sense, to: impl Fn(&Nexus) -> bool) {
        for (n, queue) in &mut self.attentions {
            if to(n) && !queue.contains(&sense) {
                queue.push_back(sense);
            }
        }
    }

    /// Owe `sense` to every registered nexus but `except`.
    fn tell_registrants(&mut self, sense: Sense, except: &Nexus) {
        let registered: Vec<Nexus> = self
            .registrations
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != except)
            .collect();
        self.tell(sense, |n| registered.contains(n));
    }

    /// Forget what absent nexuses are owed beyond the bound (those no
    /// longer registered first).
    fn bound_absent(&mut self) {
        let absent: Vec<Nexus> = self
            .attentions
            .keys()
            .filter(|n| !self.attached.contains(*n))
            .cloned()
            .collect();
        let mut over = absent.len().saturating_sub(MAX_ABSENT_ATTENTIONS);
        for registered in [false, true] {
            for n in &absent {
                if over > 0 && (self.key_of(n).is_some() == registered) {
                    self.attentions.remove(n);
                    over -= 1;
                }
            }
        }
    }

    fn unregister(&mut self, nexus: &Nexus) {
        self.registrations.retain(|(n, _)| n != nexus);
        // A holder that goes releases the reservation, unless every
        // registrant holds it and some remain.
        let released = match &self.reservation {
            Some(r) if kind::all_registrants(r.kind) => self.registrations.is_empty(),
            Some(r) => r.holder == *nexus,
            None => false,
        };
        if let Some(r) = self.reservation.take_if(|_| released) {
            if kind::for_registrants(r.kind) && !kind::all_registrants(r.kind) {
                // Registrants-only: the others lose access, and are told.
                self.tell_registrants(RELEASED, nexus);
            }
        }
    }
}

/// A logical unit shared by its initiators.
pub struct Unit {
    lun: Arc<dyn Lun>,
    state: Mutex<State>,
    /// Held shared by every medium command while it runs, and exclusively
    /// by what changes who may access the medium (PERSISTENT RESERVE OUT,
    /// MODE SELECT, RESERVE(6)): a preempted or fenced nexus's command
    /// that passed its check is done before the change is answered.
    gate: std::sync::RwLock<()>,
}

/// Most registrations a unit keeps (each initiator port one).
const MAX_REGISTRATIONS: usize = 256;
/// Most nexuses without a session a unit keeps unit attentions for.
const MAX_ABSENT_ATTENTIONS: usize = 2 * MAX_REGISTRATIONS;

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit").finish_non_exhaustive()
    }
}

/// The unit as the medium commands see it: read-only while SWP is set.
struct View<'a> {
    lun: &'a dyn Lun,
    swp: bool,
}

impl Lun for View<'_> {
    fn size(&self) -> u64 {
        self.lun.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.lun.read(offset, buf)
    }
    fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        self.lun.extent(offset)
    }
    fn id(&self) -> u64 {
        self.lun.id()
    }
    fn writable(&self) -> bool {
        self.lun.writable() && !self.swp
    }
    fn software_protected(&self) -> bool {
        self.swp
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.lun.write(offset, data)
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.lun.zero(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.lun.flush()
    }
}

impl Unit {
    /// A unit serving `lun`.
    pub fn new(lun: Arc<dyn Lun>) -> Unit {
        Unit {
            lun,
            state: Mutex::new(State::default()),
            gate: std::sync::RwLock::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session of `nexus` began.
    pub fn attach(&self, nexus: &Nexus) {
        let mut s = self.state();
        s.attached.insert(nexus.clone());
        s.attentions.entry(nexus.clone()).or_default();
    }

    /// A session of `nexus` ended (logout or a lost connection): its
    /// RESERVE(6) reservation goes; its registrations stay.
    pub fn detach(&self, nexus: &Nexus) {
        let mut s = self.state();
        s.attached.remove(nexus);
        if s.key_of(nexus).is_none() {
            s.attentions.remove(nexus);
        }
        s.bound_absent();
        if s.reserved.as_ref() == Some(nexus) {
            s.reserved = None;
        }
    }

    /// A LUN RESET or target reset from `nexus`: RESERVE(6) is released,
    /// persistent reservations stay (SPC-4 §5.13.1), and every other
    /// nexus is told of the reset (29/00 for a target reset, 29/03 for a
    /// LUN reset).
    pub fn reset(&self, nexus: &Nexus, target: bool) {
        let mut s = self.state();
        s.reserved = None;
        let sense = if target {
            Sense::new(0x06, 0x29, 0x00)
        } else {
            Sense::new(0x06, 0x29, 0x03)
        };
        s.tell(sense, |n| n != nexus);
    }

    fn view(&self, swp: bool) -> View<'_> {
        View {
            lun: &*self.lun,
            swp,
        }
    }

    /// Before a command from `nexus` runs: what it needs, or how it ends
    /// at once (a unit attention owed, a reservation conflict, a refusal).
    pub fn prepare(&self, cdb: &[u8; 16], nexus: &Nexus) -> Result<Needs, Outcome> {
        let swp = {
            let mut s = self.state();
            if let Some(sense) = owed(&mut s, cdb[0], nexus) {
                if cdb[0] == 0x03 {
                    // REQUEST SENSE reports it as its data (and clears it).
                    return Err(Outcome::Good(scsi::sense_data(cdb, sense)));
                }
                return Err(Outcome::Check(sense));
            }
            if conflicts(&s, cdb, nexus) {
                return Err(Outcome::Conflict);
            }
            s.swp
        };
        match cdb[0] {
            // MODE SELECT(6)/(10), PERSISTENT RESERVE OUT: a parameter list.
            0x15 if cdb[4] == 0 => Ok(Needs::Nothing),
            0x15 => Ok(Needs::Data(u64::from(cdb[4]))),
            0x55 if be16(&cdb[7..9]) == 0 => Ok(Needs::Nothing),
            0x55 => Ok(Needs::Data(be16(&cdb[7..9]))),
            // Without SPEC_I_PT, a PERSISTENT RESERVE OUT parameter list
            // is 24 bytes: refused before any data moves otherwise.
            0x5f if be32(&cdb[5..9]) != 24 => Err(Outcome::Check(scsi::PARAMETER_LENGTH)),
            0x5f => Ok(Needs::Data(24)),
            0x5e | 0x16 | 0x17 => Ok(Needs::Nothing),
            _ => scsi::prepare(cdb, Some(&self.view(swp))).map_err(Outcome::Check),
        }
    }

    /// Run a command from `nexus` with the data-out [`Unit::prepare`]
    /// asked for.
    pub fn execute(&self, cdb: &[u8; 16], nexus: &Nexus, data_out: &[u8]) -> Outcome {
        // COMPARE AND WRITE's read, compare and write (and ORWRITE's read
        // and write) are one step to every other command, of every
        // session (VMFS takes its locks with COMPARE AND WRITE: two hosts
        // must not both win one).
        let changes_access = matches!(cdb[0], 0x15 | 0x55 | 0x5f | 0x16 | 0x89 | 0x8b);
        // Taken before the state lock, never the other way round.
        let _exclusive =
            changes_access.then(|| self.gate.write().unwrap_or_else(|p| p.into_inner()));
        let _shared =
            (!changes_access).then(|| self.gate.read().unwrap_or_else(|p| p.into_inner()));
        let swp = {
            let mut s = self.state();
            // Checked again: another nexus may have reserved meanwhile.
            if conflicts(&s, cdb, nexus) {
                return Outcome::Conflict;
            }
            let done = match cdb[0] {
                0x15 | 0x55 => Some(mode_select(&mut s, cdb, nexus, data_out)),
                0x5e => Some(persistent_in(&s, cdb)),
                0x5f => Some(persistent_out(&mut s, cdb, nexus, data_out)),
                0x16 => Some(reserve6(&mut s, cdb, nexus)),
                0x17 => Some(release6(&mut s, nexus)),
                _ => None,
            };
            if let Some(outcome) = done {
                return outcome;
            }
            s.swp
        };
        scsi::execute(cdb, Some(&self.view(swp)), data_out)
    }
}

/// The unit attention `nexus` is owed, taken off its queue — for any
/// command but INQUIRY and REPORT LUNS (SAM-5 §5.14; REQUEST SENSE
/// returns it as its data).
fn owed(s: &mut State, opcode: u8, nexus: &Nexus) -> Option<Sense> {
    if matches!(opcode, 0x12 | 0xa0) {
        return None;
    }
    s.attentions.get_mut(nexus)?.pop_front()
}

/// Whether `nexus`'s command conflicts with a reservation (SPC-2 §5.5.1
/// for RESERVE(6), SPC-4 §5.13.1 table 63 for persistent ones).
fn conflicts(s: &State, cdb: &[u8; 16], nexus: &Nexus) -> bool {
    let opcode = cdb[0];
    if let Some(holder) = &s.reserved {
        // Persistent reservation commands conflict with a RESERVE(6), from
        // any nexus (SPC-3 §5.6.3); another nexus may only ask who and
        // what the unit is, and release (with no effect).
        return matches!(opcode, 0x5e | 0x5f)
            || holder != nexus && !matches!(opcode, 0x12 | 0xa0 | 0x03 | 0xa3 | 0x17);
    }
    let Some(r) = &s.reservation else {
        return false;
    };
    if s.holds(nexus) {
        return false;
    }
    let registered = s.key_of(nexus).is_some();
    if kind::for_registrants(r.kind) && registered {
        return false;
    }
    // What changes the unit: the medium, its cache, its mode pages.
    let writes = scsi::is_write_class(opcode) || matches!(opcode, 0x15 | 0x55 | 0x35 | 0x91);
    match opcode {
        // Allowed under every type: identification, sense, the
        // reservations themselves, TEST UNIT READY (ALLOW COMMANDS 001b),
        // READ CAPACITY(10), REPORT SUPPORTED OPERATION CODES,
        0x12 | 0xa0 | 0x03 | 0x5e | 0x5f | 0x00 | 0x25 | 0xa3 => false,
        // READ CAPACITY(16) (SBC-4 table of commands allowed).
        0x9e if cdb[1] & 0x1f == 0x10 => false,
        // RESERVE(6)/RELEASE(6) meet a persistent reservation.
        0x16 | 0x17 => true,
        _ if writes => true,
        // Reads, MODE SENSE and the rest: only exclusive access keeps
        // others out.
        _ => kind::exclusive_access(r.kind),
    }
}

fn mode_select(s: &mut State, cdb: &[u8; 16], nexus: &Nexus, data: &[u8]) -> Outcome {
    let ten = cdb[0] == 0x55;
    if cdb[1] & 0x01 != 0 {
        // SP: nothing here is saved.
        return Outcome::Check(scsi::INVALID_FIELD.at(1));
    }
    if data.is_empty() {
        return Outcome::Good(Vec::new());
    }
    let header = if ten { 8 } else { 4 };
    if data.len() < header {
        return Outcome::Check(scsi::PARAMETER_LENGTH);
    }
    let descriptors = if ten {
        be16(&data[6..8]) as usize
    } else {
        usize::from(data[3])
    };
    let mut at = header + descriptors;
    if at > data.len() {
        return Outcome::Check(scsi::PARAMETER_LENGTH);
    }
    let mut swp = s.swp;
    while at < data.len() {
        if data.len() - at < 2 || data[at] & 0x40 != 0 {
            // Truncated, or a subpage format page: none is changeable.
            return Outcome::Check(scsi::INVALID_PARAMETER);
        }
        let len = 2 + usize::from(data[at + 1]);
        let Some(page) = data.get(at..at + len) else {
            return Outcome::Check(scsi::PARAMETER_LENGTH);
        };
        let code = page[0] & 0x3f;
        let Some(mut now) = scsi::mode_page(code, s.swp) else {
            return Outcome::Check(scsi::INVALID_PARAMETER);
        };
        let mut asked = page.to_vec();
        asked[0] &= 0x3f;
        if code == 0x0a && asked.len() == now.len() {
            // Only SWP may differ from what MODE SENSE shows.
            swp = asked[4] & 0x08 != 0;
            asked[4] &= !0x08;
            now[4] &= !0x08;
        }
        // Any other page is taken when it changes nothing.
        if asked != now {
            return Outcome::Check(scsi::INVALID_PARAMETER);
        }
        at += len;
    }
    if swp != s.swp {
        s.swp = swp;
        s.tell(MODE_CHANGED, |n| n != nexus);
    }
    Outcome::Good(Vec::new())
}

fn reserve6(s: &mut State, cdb: &[u8; 16], nexus: &Nexus) -> Outcome {
    if cdb[1] & 0x01 != 0 {
        // Third-party and extent reservations are not supported.
        return Outcome::Check(scsi::INVALID_FIELD.at(1));
    }
    // Persistent registrations or a reservation rule RESERVE(6) out.
    if s.reservation.is_some() || !s.registrations.is_empty() {
        return Outcome::Conflict;
    }
    match &s.reserved {
        Some(holder) if holder != nexus => Outcome::Conflict,
        _ => {
            s.reserved = Some(nexus.clone());
            Outcome::Good(Vec::new())
        }
    }
}

fn release6(s: &mut State, nexus: &Nexus) -> Outcome {
    if s.reservation.is_some() {
        return Outcome::Conflict;
    }
    if s.reserved.as_ref() == Some(nexus) {
        s.reserved = None;
    }
    Outcome::Good(Vec::new())
}

/// PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT
/// CAPABILITIES, READ FULL STATUS.
fn persistent_in(s: &State, cdb: &[u8; 16]) -> Outcome {
    let alloc = be16(&cdb[7..9]) as usize;
    let mut d = Vec::new();
    match cdb[1] & 0x1f {
        0 => {
            d.extend_from_slice(&s.generation.to_be_bytes());
            d.extend_from_slice(&((8 * s.registrations.len()) as u32).to_be_bytes());
            for (_, key) in &s.registrations {
                d.extend_from_slice(&key.to_be_bytes());
            }
        }
        1 => {
            d.extend_from_slice(&s.generation.to_be_bytes());
            match &s.reservation {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    // All-registrants: the key is zero.
                    let key = if kind::all_registrants(r.kind) {
                        0
                    } else {
                        s.key_of(&r.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    d.push(0);
                    d.push(r.kind);
                    d.extend_from_slice(&[0; 2]);
                }
            }
        }
        2 => {
            d = vec![0u8; 8];
            d[1] = 8;
            // CRH, SIP_C, ATP_C, PTPL_C: none (byte 2 zero). TMV, ALLOW
            // COMMANDS 001b: TEST UNIT READY is allowed under every type.
            d[3] = 0x80 | 0x10;
            // Types: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
            d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
            d[5] = 0x01;
        }
        3 => {
            d.extend_from_slice(&s.generation.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            for (n, key) in &s.registrations {
                let id = n.transport_id();
                let mut e = vec![0u8; 24];
                e[..8].copy_from_slice(&key.to_be_bytes());
                if let Some(r) = &s.reservation {
                    if s.holds(n) {
                        e[12] = 0x01;
                        e[13] = r.kind;
                    }
                }
                // Relative target port 1.
                e[18..20].copy_from_slice(&1u16.to_be_bytes());
                e[20..24].copy_from_slice(&(id.len() as u32).to_be_bytes());
                e.extend(id);
                d.extend(e);
            }
            let len = (d.len() - 8) as u32;
            d[4..8].copy_from_slice(&len.to_be_bytes());
        }
        _ => return Outcome::Check(scsi::INVALID_FIELD.at(1)),
    }
    d.truncate(alloc);
    Outcome::Good(d)
}

/// PERSISTENT RESERVE OUT: REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT,
/// PREEMPT AND ABORT, REGISTER AND IGNORE EXISTING KEY.
fn persistent_out(s: &mut State, cdb: &[u8; 16], nexus: &Nexus, data: &[u8]) -> Outcome {
    let action = cdb[1] & 0x1f;
    let scope = cdb[2] >> 4;
    let kind = cdb[2] & 0x0f;
    if !matches!(action, 0..=6) {
        return Outcome::Check(scsi::INVALID_FIELD.at(1));
    }
    if data.len() != 24 {
        return Outcome::Check(scsi::PARAMETER_LENGTH);
    }
    let key = be64(&data[0..8]);
    let sa_key = be64(&data[8..16]);
    let flags = data[20];
    // SPEC_I_PT and ALL_TG_PT are not supported (one port); APTPL: nothing
    // outlives the export.
    if flags & (0x08 | 0x04 | 0x01) != 0 {
        return Outcome::Check(scsi::INVALID_PARAMETER);
    }
    let current = s.key_of(nexus);
    match action {
        // REGISTER, REGISTER AND IGNORE EXISTING KEY.
        0 | 6 => {
            match current {
                None if action == 0 && key != 0 => return Outcome::Conflict,
                Some(k) if action == 0 && k != key => return Outcome::Conflict,
                None if sa_key == 0 => return Outcome::Good(Vec::new()),
                None if s.registrations.len() >= MAX_REGISTRATIONS => {
                    return Outcome::Check(NO_REGISTRATION_ROOM)
                }
                None => s.registrations.push((nexus.clone(), sa_key)),
                Some(_) if sa_key == 0 => s.unregister(nexus),
                Some(_) => {
                    for (n, k) in &mut s.registrations {
                        if n == nexus {
                            *k = sa_key;
                        }
                    }
                }
            }
            s.generation = s.generation.wrapping_add(1);
            Outcome::Good(Vec::new())
        }
        _ if current != Some(key) => Outcome::Conflict,
        // RESERVE.
        1 => {
            if scope != 0 || !kind::valid(kind) {
                return Outcome::Check(scsi::INVALID_FIELD.at(2));
            }
            match &s.reservation {
                None => {
                    s.reservation = Some(Reservation {
                        holder: nexus.clone(),
                        kind,
                    });
                    Outcome::Good(Vec::new())
                }
                Some(r) if s.holds(nexus) && r.kind == kind => Outcome::Good(Vec::new()),
                Some(_) => Outcome::Conflict,
            }
        }
        // RELEASE.
        2 => {
            let Some(r) = s.reservation.clone() else {
                return Outcome::Good(Vec::new());
            };
            if !s.holds(nexus) {
                return Outcome::Good(Vec::new());
            }
            if scope != 0 || r.kind != kind {
                return Outcome::Check(INVALID_RELEASE);
            }
            s.reservation = None;
            if kind::for_registrants(r.kind) {
                s.tell_registrants(RELEASED, nexus);
            }
            Outcome::Good(Vec::new())
        }
        // CLEAR.
        3 => {
            s.tell_registrants(PREEMPTED, nexus);
            s.registrations.clear();
            s.reservation = None;
            s.generation = s.generation.wrapping_add(1);
            Outcome::Good(Vec::new())
        }
        // PREEMPT, PREEMPT AND ABORT: the preempted nexuses' commands
        // that passed their checks have finished (the gate, taken in
        // `execute`); their later ones conflict. Nothing else is queued
        // here to abort (a session runs one command at a time).
        _ => preempt(s, nexus, sa_key, scope, kind),
    }
}

fn preempt(s: &mut State, nexus: &Nexus, sa_key: u64, scope: u8, kind: u8) -> Outcome {
    let all = s
        .reservation
        .as_ref()
        .is_some_and(|r| kind::all_registrants(r.kind));
    let holder_key = match &s.reservation {
        Some(r) if !kind::all_registrants(r.kind) => s.key_of(&r.holder),
        _ => None,
    };
    let takes_reservation = match &s.reservation {
        None => false,
        Some(_) if all => sa_key == 0,
        Some(_) => holder_key == Some(sa_key),
    };
    if takes_reservation && (scope != 0 || !kind::valid(kind)) {
        return Outcome::Check(scsi::INVALID_FIELD.at(2));
    }
    if sa_key == 0 && !all {
        return Outcome::Check(scsi::INVALID_PARAMETER);
    }
    // Who loses their registration: those with the key (all-registrants
    // with key 0: every other registrant).
    let gone: Vec<Nexus> = s
        .registrations
        .iter()
        .filter(|(n, k)| n != nexus && (*k == sa_key || all && sa_key == 0))
        .map(|(n, _)| n.clone())
        .collect();
    if gone.is_empty() && !takes_reservation {
        return Outcome::Conflict;
    }
    s.registrations.retain(|(n, _)| !gone.contains(n));
    if takes_reservation {
        let before = s.reservation.replace(Reservation {
            holder: nexus.clone(),
            kind,
        });
        if before.is_some_and(|r| r.kind != kind) {
            // A new type: the registrants that stay are told theirs went
            // (SPC-4 §5.13.11.4.3).
            s.tell_registrants(RELEASED, nexus);
        }
    }
    s.generation = s.generation.wrapping_add(1);
    s.tell(REGISTRATIONS_PREEMPTED, |n| gone.contains(n));
    Outcome::Good(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::scsi::testing::RwMem;

    fn unit() -> (Unit, Nexus, Nexus) {
        let unit = Unit::new(Arc::new(RwMem::new(vec![0x5a; 64 << 10])));
        let a = Nexus::new("iqn.a", [1; 6]);
        let b = Nexus::new("iqn.b", [2; 6]);
        unit.attach(&a);
        unit.attach(&b);
        (unit, a, b)
    }

    /// Prepare and run, as the target does.
    fn run(unit: &Unit, nexus: &Nexus, cdb: [u8; 16], data: &[u8]) -> Outcome {
        match unit.prepare(&cdb, nexus) {
            Err(o) => o,
            Ok(Needs::Nothing) => unit.execute(&cdb, nexus, &[]),
            Ok(Needs::Data(n)) => {
                assert_eq!(n as usize, data.len(), "{cdb:?}");
                unit.execute(&cdb, nexus, data)
            }
        }
    }

    fn tur() -> [u8; 16] {
        [0; 16]
    }

    fn read10() -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x28;
        c[8] = 1;
        c
    }

    fn write10(unit: &Unit, nexus: &Nexus) -> Outcome {
        let mut c = [0u8; 16];
        c[0] = 0x2a;
        c[8] = 1;
        run(unit, nexus, c, &[7; 512])
    }

    fn prout(unit: &Unit, nexus: &Nexus, action: u8, kind: u8, key: u64, sa_key: u64) -> Outcome {
        let mut c = [0u8; 16];
        c[0] = 0x5f;
        c[1] = action;
        c[2] = kind;
        c[8] = 24;
        let mut d = [0u8; 24];
        d[..8].copy_from_slice(&key.to_be_bytes());
        d[8..16].copy_from_slice(&sa_key.to_be_bytes());
        run(unit, nexus, c, &d)
    }

    fn prin(unit: &Unit, nexus: &Nexus, action: u8, alloc: u16) -> Outcome {
        let mut c = [0u8; 16];
        c[0] = 0x5e;
        c[1] = action;
        c[7..9].copy_from_slice(&alloc.to_be_bytes());
        run(unit, nexus, c, &[])
    }

    fn good(o: Outcome) -> Vec<u8> {
        match o {
            Outcome::Good(d) => d,
            other => panic!("not GOOD: {other:?}"),
        }
    }

    fn simple(opcode: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode;
        c
    }

    const EMPTY: Outcome = Outcome::Good(Vec::new());

    #[test]
    fn write_exclusive_keeps_others_from_writes_only() {
        let (u, a, b) = unit();
        assert_eq!(prout(&u, &a, 6, 0, 0, 0xaa), EMPTY);
        assert_eq!(prout(&u, &b, 6, 0, 0, 0xbb), EMPTY);
        // A wrong key is a conflict, not a registration.
        assert_eq!(prout(&u, &b, 0, 0, 0x1, 0xcc), Outcome::Conflict);
        assert_eq!(prout(&u, &a, 1, 1, 0xaa, 0), EMPTY);
        assert_eq!(write10(&u, &a), EMPTY);
        assert!(matches!(run(&u, &b, read10(), &[]), Outcome::Good(_)));
        assert_eq!(write10(&u, &b), Outcome::Conflict);
        assert_eq!(run(&u, &b, tur(), &[]), EMPTY);
        // Keys in registration order; RESERVE did not bump PRgeneration.
        let keys = good(prin(&u, &b, 0, 1024));
        assert_eq!(&keys[..8], &[0, 0, 0, 2, 0, 0, 0, 16]);
        assert_eq!(&keys[8..16], &0xaau64.to_be_bytes());
        assert_eq!(&keys[16..24], &0xbbu64.to_be_bytes());
        // Truncated: the full length still said.
        assert_eq!(good(prin(&u, &b, 0, 8)), keys[..8].to_vec());
        let r = good(prin(&u, &b, 1, 1024));
        assert_eq!(r.len(), 24);
        assert_eq!(&r[8..16], &0xaau64.to_be_bytes());
        assert_eq!(r[21], 1);
        // Releasing with another type is an error; with its own, done.
        assert_eq!(
            prout(&u, &a, 2, 3, 0xaa, 0),
            Outcome::Check(INVALID_RELEASE)
        );
        assert_eq!(prout(&u, &a, 2, 1, 0xaa, 0), EMPTY);
        assert_eq!(write10(&u, &b), EMPTY);
    }

    #[test]
    fn exclusive_access_keeps_others_from_reads_too() {
        let (u, a, b) = unit();
        prout(&u, &a, 6, 0, 0, 1);
        assert_eq!(prout(&u, &a, 1, 3, 1, 0), EMPTY);
        assert_eq!(run(&u, &b, read10(), &[]), Outcome::Conflict);
        assert_eq!(run(&u, &b, simple(0x1a), &[]), Outcome::Conflict);
        // Asking what the unit is still works.
        assert!(matches!(run(&u, &b, simple(0x12), &[]), Outcome::Good(_)));
        // Another nexus cannot take it over by reserving.
        prout(&u, &b, 6, 0, 0, 2);
        assert_eq!(prout(&u, &b, 1, 3, 2, 0), Outcome::Conflict);
    }

    #[test]
    fn registrants_only_ends_with_its_holder_and_all_registrants_does_not() {
        let (u, a, b) = unit();
        prout(&u, &a, 6, 0, 0, 1);
        prout(&u, &b, 6, 0, 0, 2);
        assert_eq!(prout(&u, &a, 1, 5, 1, 0), EMPTY);
        assert_eq!(write10(&u, &b), EMPTY, "a registrant writes");
        // The holder unregisters: the reservation goes, B is told once.
        assert_eq!(prout(&u, &a, 0, 0, 1, 0), EMPTY);
        assert_eq!(run(&u, &b, tur(), &[]), Outcome::Check(RELEASED));
        assert_eq!(run(&u, &b, tur(), &[]), EMPTY);
        assert_eq!(good(prin(&u, &b, 1, 64)).len(), 8);

        prout(&u, &a, 6, 0, 0, 1);
        assert_eq!(prout(&u, &a, 1, 8, 1, 0), EMPTY);
        assert_eq!(prout(&u, &a, 0, 0, 1, 0), EMPTY);
        // Still held, by every registrant (key 0); B may release it.
        let r = good(prin(&u, &b, 1, 64));
        assert_eq!((r.len(), &r[8..16], r[21]), (24, &[0u8; 8][..], 8));
        assert_eq!(run(&u, &a, read10(), &[]), Outcome::Conflict);
        assert_eq!(prout(&u, &b, 2, 8, 2, 0), EMPTY);
        assert!(matches!(run(&u, &a, read10(), &[]), Outcome::Good(_)));
        assert_eq!(
            run(&u, &b, tur(), &[]),
            EMPTY,
            "no attention for its own release"
        );
    }

    #[test]
    fn preempt_takes_the_reservation_and_clear_ends_everything() {
        let (u, a, b) = unit();
        prout(&u, &a, 6, 0, 0, 1);
        prout(&u, &b, 6, 0, 0, 2);
        prout(&u, &a, 1, 3, 1, 0);
        let before = u32::from_be_bytes(good(prin(&u, &a, 0, 8))[..4].try_into().unwrap());
        assert_eq!(prout(&u, &b, 4, 1, 2, 1), EMPTY);
        let keys = good(prin(&u, &b, 0, 64));
        assert_eq!(
            u32::from_be_bytes(keys[..4].try_into().unwrap()),
            before + 1
        );
        assert_eq!(&keys[4..], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2]);
        let r = good(prin(&u, &b, 1, 64));
        assert_eq!((&r[8..16], r[21]), (&2u64.to_be_bytes()[..], 1));
        assert_eq!(
            run(&u, &a, tur(), &[]),
            Outcome::Check(REGISTRATIONS_PREEMPTED)
        );
        assert_eq!(write10(&u, &a), Outcome::Conflict);
        // Preempting a key nobody has: a conflict.
        assert_eq!(prout(&u, &b, 4, 1, 2, 9), Outcome::Conflict);

        prout(&u, &a, 6, 0, 0, 1);
        assert_eq!(prout(&u, &b, 3, 0, 2, 0), EMPTY);
        assert_eq!(good(prin(&u, &b, 0, 64))[4..8], [0, 0, 0, 0]);
        assert_eq!(good(prin(&u, &b, 1, 64)).len(), 8);
        assert_eq!(run(&u, &a, tur(), &[]), Outcome::Check(PREEMPTED));
        assert_eq!(write10(&u, &a), EMPTY);
    }

    #[test]
    fn read_full_status_names_each_initiator_port() {
        let (u, a, _) = unit();
        prout(&u, &a, 6, 0, 0, 7);
        prout(&u, &a, 1, 1, 7, 0);
        let d = good(prin(&u, &a, 3, 1024));
        assert_eq!(
            u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len() - 8
        );
        assert_eq!(&d[8..16], &7u64.to_be_bytes());
        assert_eq!((d[20], d[21]), (0x01, 1), "R_HOLDER, type");
        let id = &d[32..];
        assert_eq!(id[0], 0x45);
        let text = b"iqn.a,i,0x010101010101\0";
        assert_eq!(&id[4..4 + text.len()], text);
        assert_eq!(id.len() % 4, 0);
        // Service actions past READ FULL STATUS: a field error, not an
        // unknown opcode.
        assert_eq!(
            prin(&u, &a, 4, 64),
            Outcome::Check(scsi::INVALID_FIELD.at(1))
        );
    }

    #[test]
    fn a_parameter_list_that_is_not_24_bytes_is_refused_before_data_moves() {
        let (u, a, _) = unit();
        let mut c = simple(0x5f);
        c[5..9].copy_from_slice(&(1u32 << 31).to_be_bytes());
        assert_eq!(
            u.prepare(&c, &a),
            Err(Outcome::Check(scsi::PARAMETER_LENGTH))
        );
        // SPEC_I_PT, ALL_TG_PT, APTPL are not offered.
        let mut d = [0u8; 24];
        d[15] = 1;
        d[20] = 0x01;
        c[5..9].copy_from_slice(&24u32.to_be_bytes());
        assert_eq!(
            u.execute(&c, &a, &d),
            Outcome::Check(scsi::INVALID_PARAMETER)
        );
    }

    #[test]
    fn reserve6_is_released_by_its_holder_going_or_a_reset() {
        let (u, a, b) = unit();
        assert_eq!(run(&u, &a, simple(0x16), &[]), EMPTY);
        assert_eq!(
            run(&u, &a, simple(0x16), &[]),
            EMPTY,
            "again, by its holder"
        );
        assert_eq!(run(&u, &b, simple(0x16), &[]), Outcome::Conflict);
        assert_eq!(run(&u, &b, simple(0x1a), &[]), Outcome::Conflict);
        assert_eq!(run(&u, &b, tur(), &[]), Outcome::Conflict);
        assert!(matches!(run(&u, &b, simple(0x12), &[]), Outcome::Good(_)));
        // Another's release: good, and no effect.
        assert_eq!(run(&u, &b, simple(0x17), &[]), EMPTY);
        assert_eq!(run(&u, &b, simple(0x16), &[]), Outcome::Conflict);
        // The holder's session ends: released.
        u.detach(&a);
        assert_eq!(run(&u, &b, simple(0x16), &[]), EMPTY);
        u.attach(&a);
        // A LUN reset releases it too, and the others hear of it.
        u.reset(&b, false);
        assert_eq!(
            run(&u, &a, tur(), &[]),
            Outcome::Check(Sense::new(0x06, 0x29, 0x03))
        );
        assert_eq!(run(&u, &a, simple(0x16), &[]), EMPTY);
        // Persistent registrations keep RESERVE(6) out.
        assert_eq!(run(&u, &a, simple(0x17), &[]), EMPTY);
        prout(&u, &b, 6, 0, 0, 2);
        assert_eq!(run(&u, &a, simple(0x16), &[]), Outcome::Conflict);
    }

    fn mode_select6(u: &Unit, n: &Nexus, swp: bool, tweak: impl Fn(&mut [u8])) -> Outcome {
        let mut page = scsi::mode_page(0x0a, swp).unwrap();
        tweak(&mut page);
        let mut data = vec![0u8; 4];
        data.extend(page);
        let mut c = simple(0x15);
        c[1] = 0x10;
        c[4] = data.len() as u8;
        run(u, n, c, &data)
    }

    #[test]
    fn software_write_protect_stops_writes_until_cleared() {
        let (u, a, b) = unit();
        // Only SWP may change.
        assert_eq!(
            mode_select6(&u, &a, false, |p| p[2] = 0),
            Outcome::Check(scsi::INVALID_PARAMETER)
        );
        assert_eq!(mode_select6(&u, &a, true, |_| {}), EMPTY);
        // The other nexus hears that mode parameters changed, once.
        assert_eq!(write10(&u, &b), Outcome::Check(MODE_CHANGED));
        assert!(matches!(write10(&u, &b), Outcome::Check(s) if s.key == 0x07));
        assert!(matches!(write10(&u, &a), Outcome::Check(s) if s.key == 0x07));
        let mut sense = simple(0x1a);
        sense[2] = 0x0a;
        sense[4] = 255;
        let d = good(run(&u, &a, sense, &[]));
        assert_eq!(d[2] & 0x80, 0x80, "WP in the header");
        assert_eq!(d[4 + 8 + 4] & 0x08, 0x08, "SWP in the control page");
        // Changeable values: SWP only.
        sense[2] = 0x4a;
        let d = good(run(&u, &a, sense, &[]));
        assert_eq!(&d[12..24], &[0x0a, 0x0a, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(mode_select6(&u, &b, false, |_| {}), EMPTY);
        assert_eq!(run(&u, &a, tur(), &[]), Outcome::Check(MODE_CHANGED));
        assert_eq!(write10(&u, &a), EMPTY);
    }

    #[test]
    fn request_sense_reports_an_attention_and_clears_it() {
        let (u, a, b) = unit();
        u.reset(&b, false);
        let mut c = simple(0x03);
        c[4] = 252;
        let d = good(run(&u, &a, c, &[]));
        assert_eq!((d[2], d[12], d[13]), (0x06, 0x29, 0x03));
        assert_eq!(run(&u, &a, tur(), &[]), EMPTY, "cleared");
        // With nothing owed: NO SENSE.
        assert_eq!(good(run(&u, &a, c, &[]))[2], 0);
    }

    #[test]
    fn persistent_reservation_commands_conflict_with_reserve6_even_for_its_holder() {
        let (u, a, b) = unit();
        assert_eq!(run(&u, &a, simple(0x16), &[]), EMPTY);
        assert_eq!(prout(&u, &a, 6, 0, 0, 1), Outcome::Conflict);
        assert_eq!(prin(&u, &b, 0, 64), Outcome::Conflict);
        // So RESERVE(6) can always be released by its holder.
        assert_eq!(run(&u, &a, simple(0x17), &[]), EMPTY);
        assert_eq!(prout(&u, &a, 6, 0, 0, 1), EMPTY);
    }

    #[test]
    fn read_capacity16_is_allowed_under_exclusive_access() {
        let (u, a, b) = unit();
        prout(&u, &a, 6, 0, 0, 1);
        prout(&u, &a, 1, 3, 1, 0);
        let mut rc16 = simple(0x9e);
        rc16[1] = 0x10;
        rc16[13] = 32;
        assert!(matches!(run(&u, &b, rc16, &[]), Outcome::Good(d) if d.len() == 32));
        assert_eq!(run(&u, &b, read10(), &[]), Outcome::Conflict);
    }

    #[test]
    fn a_preempt_that_changes_the_type_tells_the_registrants_that_stay() {
        let (u, a, b) = unit();
        let c = Nexus::new("iqn.c", [3; 6]);
        u.attach(&c);
        prout(&u, &a, 6, 0, 0, 1);
        prout(&u, &b, 6, 0, 0, 2);
        prout(&u, &c, 6, 0, 0, 3);
        prout(&u, &a, 1, 5, 1, 0);
        assert_eq!(prout(&u, &b, 4, 6, 2, 1), EMPTY);
        assert_eq!(
            run(&u, &a, tur(), &[]),
            Outcome::Check(REGISTRATIONS_PREEMPTED)
        );
        assert_eq!(run(&u, &c, tur(), &[]), Outcome::Check(RELEASED));
        assert_eq!(run(&u, &b, tur(), &[]), EMPTY, "not the preemptor");
    }

    #[test]
    fn mode_select_with_no_parameter_list_needs_no_data() {
        let (u, a, _) = unit();
        assert_eq!(u.prepare(&simple(0x15), &a), Ok(Needs::Nothing));
        assert_eq!(u.prepare(&simple(0x55), &a), Ok(Needs::Nothing));
        assert_eq!(run(&u, &a, simple(0x55), &[]), EMPTY);
    }

    #[test]
    fn registrations_are_capped() {
        let (u, a, _) = unit();
        for i in 0..MAX_REGISTRATIONS {
            let n = Nexus::new(
                "iqn.many",
                (i as u64).to_be_bytes()[2..].try_into().unwrap(),
            );
            assert_eq!(prout(&u, &n, 6, 0, 0, 1 + i as u64), EMPTY);
        }
        assert_eq!(
            prout(&u, &a, 6, 0, 0, 9999),
            Outcome::Check(NO_REGISTRATION_ROOM)
        );
    }

    /// A unit whose writes say they started (`started`), then wait for a
    /// go-ahead (`go`), and two nexuses attached to it.
    struct Slow {
        unit: Arc<Unit>,
        started: std::sync::mpsc::Receiver<()>,
        go: std::sync::mpsc::Sender<()>,
        a: Nexus,
        b: Nexus,
    }

    fn slow_unit() -> Slow {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let (started_tx, go_rx) = (Mutex::new(started_tx), Mutex::new(go_rx));
        let unit = Arc::new(Unit::new(Arc::new(RwMem::with(
            vec![0; 1 << 20],
            Box::new(move || {
                started_tx.lock().unwrap().send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                Ok(())
            }),
        ))));
        let a = Nexus::new("iqn.a", [1; 6]);
        let b = Nexus::new("iqn.b", [2; 6]);
        unit.attach(&a);
        unit.attach(&b);
        Slow {
            unit,
            started,
            go,
            a,
            b,
        }
    }

    #[test]
    fn preempt_and_abort_waits_for_the_preempted_nexus_commands_in_flight() {
        let Slow {
            unit: u,
            started,
            go,
            a,
            b,
        } = slow_unit();
        prout(&u, &a, 6, 0, 0, 1);
        prout(&u, &b, 6, 0, 0, 2);
        prout(&u, &b, 1, 5, 2, 0);
        // B's write passes its check and is under way ...
        let writer = {
            let (u, b) = (u.clone(), b.clone());
            std::thread::spawn(move || write10(&u, &b))
        };
        started.recv().unwrap();
        // ... when A preempts B and aborts its tasks.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let preempt = {
            let (u, a, done) = (u.clone(), a.clone(), done.clone());
            std::thread::spawn(move || {
                let o = prout(&u, &a, 5, 1, 1, 2);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                o
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "PREEMPT AND ABORT answered while the preempted write still ran"
        );
        go.send(()).unwrap();
        assert_eq!(writer.join().unwrap(), EMPTY);
        assert_eq!(preempt.join().unwrap(), EMPTY);
        // From now on B is fenced.
        go.send(()).unwrap();
        assert_eq!(write10(&u, &b), Outcome::Check(REGISTRATIONS_PREEMPTED));
        assert_eq!(write10(&u, &b), Outcome::Conflict);
    }

    /// Two COMPARE AND WRITEs of one block from two sessions, with the
    /// same compare data: one writes, the other miscompares, also while
    /// the first's write is slow (the second waits for it).
    #[test]
    fn compare_and_write_is_one_step_across_sessions() {
        let Slow {
            unit: u,
            started,
            go,
            a,
            b,
        } = slow_unit();
        let caw = |u: Arc<Unit>, n: Nexus, new: u8| {
            std::thread::spawn(move || {
                let mut c = [0u8; 16];
                c[0] = 0x89;
                c[13] = 1;
                let mut data = vec![0u8; 512];
                data.extend([new; 512]);
                run(&u, &n, c, &data)
            })
        };
        let first = caw(u.clone(), a, 1);
        started.recv().unwrap();
        let second = caw(u.clone(), b, 2);
        std::thread::sleep(std::time::Duration::from_millis(200));
        go.send(()).unwrap();
        // (Were they not one step, the second's write would wait here too.)
        let _ = go.send(());
        assert_eq!(first.join().unwrap(), EMPTY);
        match second.join().unwrap() {
            Outcome::Check(s) => {
                assert_eq!((s.key, s.asc), (scsi::MISCOMPARE.key, scsi::MISCOMPARE.asc))
            }
            other => panic!("both compared equal: {other:?}"),
        }
    }

    #[test]
    fn a_registrant_preempted_while_away_hears_it_when_back() {
        let (u, a, b) = unit();
        prout(&u, &a, 6, 0, 0, 1);
        prout(&u, &b, 6, 0, 0, 2);
        u.detach(&a);
        assert_eq!(prout(&u, &b, 4, 1, 2, 1), EMPTY);
        u.attach(&a);
        assert_eq!(
            run(&u, &a, tur(), &[]),
            Outcome::Check(REGISTRATIONS_PREEMPTED)
        );
        assert_eq!(run(&u, &a, tur(), &[]), EMPTY);
        // One that was never registered is owed nothing once gone.
        let c = Nexus::new("iqn.c", [3; 6]);
        u.attach(&c);
        u.detach(&c);
        assert!(!u.state().attentions.contains_key(&c));
    }

    #[test]
    fn what_absent_nexuses_are_owed_is_bounded() {
        let (u, a, _) = unit();
        // Rounds of 200 nexuses that register, go, and are cleared while
        // away: each keeps an attention for its return.
        for round in 0..3u64 {
            for i in 0..200u64 {
                let isid = (round * 1000 + i).to_be_bytes()[2..].try_into().unwrap();
                let n = Nexus::new("iqn.many", isid);
                u.attach(&n);
                assert_eq!(prout(&u, &n, 6, 0, 0, 1 + i), EMPTY);
                u.detach(&n);
            }
            prout(&u, &a, 6, 0, 0, 9999);
            assert_eq!(prout(&u, &a, 3, 0, 9999, 0), EMPTY);
        }
        let absent = u.state().attentions.len() - 2;
        assert!(
            absent <= MAX_ABSENT_ATTENTIONS,
            "{absent} absent nexuses kept"
        );
        assert!(absent >= 200, "the latest round's attentions were dropped");
    }
}
