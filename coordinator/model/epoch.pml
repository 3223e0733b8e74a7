/*
 * epoch.pml: a spin (Promela) model of cutline's epoch protocol.
 *
 * One coordinator (coordinator/src/phase.rs, actor.rs, record.rs, state.rs) and N = 3
 * members, each a sidecar with its epoch slot (sidecar/src/slot.rs), its VM
 * (sidecar/src/vm.rs) and its checkpoint store (sidecar/src/store), over a network that
 * loses, duplicates and reorders messages and drops connections.  The coordinator
 * crashes and restarts with a persisted incarnation (raised at each start) and a
 * persisted next-epoch counter; sidecars crash and restart, losing their volatile state
 * and keeping their durable checkpoints; VMs fail.  Every fault is bounded by a counter.
 *
 * coordinator/model/README.md maps every variable, message and step to the code, says
 * what is abstracted and why, and lists the properties:
 *   (a) a record never mixes cuts            assert at the record's link
 *   (b) no committed checkpoint is deleted   assert at every removal from a store
 *   (c) at most one record per epoch         assert at Start and at the record's link
 *   (d) recovery restores one committed epoch assert at resume and at Recovered
 *   (e) no epoch commits while a restored guest is still paused  assert at the link
 *   live: once the faults stop, an epoch commits with every VM running
 *         ltl live, checked with -a -f
 *
 * Variants (-D on the spin command line):
 *   BAD_COUNT_COMMIT  the coordinator counts Durable messages (of any epoch, in any
 *                     stage, whatever their checkpoint) and commits at N of them.
 *   BAD_DISCARD       a sidecar welcomed by the coordinator discards every checkpoint
 *                     not named committed, instead of exactly those named aborted.
 *   TCP               the network keeps each connection's order and neither drops nor
 *                     duplicates within a connection (only connection drops lose).
 *   FIX_ATTEMPT       what-if, not the code: recovery messages carry the attempt
 *                     (epoch + 16 * attempt), answers of another attempt are discarded,
 *                     and a sidecar still restoring the same epoch answers the newer
 *                     attempt; checks that this closes the problem README.md describes.
 * Bounds (-D, defaults below): EF, F_TOTAL and one budget per fault kind.
 */

#define N 3

#ifndef EF
#define EF 2            /* epochs that may start while faults may still happen */
#endif
#ifndef EA
#define EA 2            /* epochs that may start once the faults have stopped */
#endif
#define MAXE (EF + EA)  /* highest epoch number */
#define KEEP 2          /* `--keep` (default 2): records kept by Catalog::prune */
#define ATTEMPTS 3      /* `--recovery-attempts` (default 3) */
#define CAP 8           /* capacity of one direction of one connection */
#define MAXID 7         /* checkpoint ids 1..7 per member (a bitmask in a byte) */

#ifndef F_TOTAL
#define F_TOTAL 3       /* faults in all */
#endif
#ifndef F_CCRASH
#define F_CCRASH 1      /* coordinator SIGKILLed (and restarted) */
#endif
#ifndef F_SCRASH
#define F_SCRASH 1      /* a sidecar SIGKILLed (and restarted) */
#endif
#ifndef F_VMFAIL
#define F_VMFAIL 1      /* a QEMU dies */
#endif
#ifndef F_DISC
#define F_DISC 1        /* a connection drops (or a sidecar goes silent) */
#endif
#ifndef F_NET
#define F_NET 1         /* one message lost, duplicated or overtaken */
#endif
#ifndef F_REC
#define F_REC 1         /* the record cannot be written (before or after its link) */
#endif
#ifndef F_SLOW
#define F_SLOW 1        /* a deadline passes while something still moves; a member refuses */
#endif
#ifndef FAULTY
#define FAULTY 1        /* members 0..FAULTY-1 may fail: the members are symmetric, so
                         * member 0 stands for any one of them */
#endif
#ifdef TCP
#undef F_NET
#define F_NET 0
#endif

/* ---- messages (sidecar/proto/src/msg.rs, Msg) -------------------------------------- */
mtype = {
  PREPARE, CUT, COMMIT, ABORT, RESTORE, RESUME,                  /* coordinator -> member */
  VOTE, CUTDONE, DURABLE, STEPFAILED, VMFAILED, RESTORED, RESUMED /* member -> coordinator */
};
/* Envelope { inc, msg }: kind, incarnation, epoch, argument (checkpoint id; the keep
 * list of Commit as a bitmask; yes=1/no=0 of Vote) */
chan toM[N] = [CAP] of { mtype, byte, byte, byte };
chan toC[N] = [CAP] of { mtype, byte, byte, byte };

/* ---- coordinator: persisted (state.rs Durable, record.rs Catalog) ------------------- */
byte cinc = 1;                 /* Durable::incarnation (1 after the first start) */
byte next_epoch = 1;           /* Durable::next_epoch */
bool rec[8];                   /* Catalog: a record of epoch e is in epochs/ */
byte rec_ck[8 * N];            /* MemberRecord::checkpoint of member m in epoch e */

/* ---- coordinator: volatile (phase.rs Phase, actor.rs Actor/Member) ------------------ */
#define IDLE 0
#define EPOCH 1
#define RECOV 2
#define HALTED 3
byte phase = IDLE;
#define PREPARING 0
#define CUTTING 1
#define STORING 2
#define COMMITTING 3
byte ep;                       /* EpochRun::epoch */
byte step;                     /* EpochRun::step */
#define ASKED 0
#define VOTED 1
#define SCUT 2
#define SDUR 3
byte stage[N];                 /* Progress::stage */
byte cutck[N];                 /* Stage::Cut { checkpoint } */
byte durck[N];                 /* Stage::Durable { checkpoint } */
byte ndur;                     /* BAD_COUNT_COMMIT only: Durable messages counted */
byte writing;                  /* record write: 0 none, 1 to link, 2 linked, dir fsync to come */
#define T_RESTORING 0
#define T_RESTORED 1
#define T_RESUMED 2
byte r_ep;                     /* Recovery::epoch */
bool r_resuming;               /* Recovery::step == Resuming */
byte tstate[N];                /* Target::state */
byte r_ck[N];                  /* Target::checkpoint */
byte attempt;                  /* Recovery::attempt */
bool last_recovery;            /* Actor::last_recovery is set (latent window) */
bool conn[N];                  /* Member::conn.is_some() */
bool closing[N];               /* Input::Closed of that connection still queued */
#define H_UNKNOWN 0
#define H_UP 1
#define H_FAILED 2
#define H_LOST 3
byte health[N];                /* Member::health */
bool pidk[N];                  /* Member::pid is known (failure detection on evidence) */

/* ---- members (slot.rs Slot, vm.rs VmState, agent.rs Agent, store) ------------------- */
byte sess[N];                  /* Agent::session: its incarnation, 0 = none */
#define FREE 0
#define ARMING 1
#define ARMED 2
#define STORINGS 3
#define DURABLES 4
byte slot[N];                  /* Slot */
byte s_inc[N];                 /* Slot's Tag::inc */
byte s_ep[N];                  /* Slot's Tag::epoch */
byte s_ck[N];                  /* Slot's checkpoint */
bool s_abt[N];                 /* Slot::Arming { aborted } */
bool prepared[N];              /* Agent::prepared (the armed checkpoint) */
bool bg[N];                    /* a store in flight (Agent::busy) */
byte bg_inc[N];
byte bg_ep[N];
byte bg_ck[N];
bool bg_abandoned[N];          /* Agent::abandoned holds its tag */
#define RUNNING 0
#define FAILED 1
#define RESTORING 2
#define PAUSED 3
byte vm[N];                    /* VmState (Running also stands for Detached+attached) */
byte vm_inc[N];                /* the rollback's Tag */
byte vm_ep[N];
byte restore_ck[N];            /* Agent::restore_for */
bool rtask[N];                 /* a restore in flight */
byte store[N];                 /* durable: manifests, bit id */
bool refusing[N];                  /* the next Prepare is refused (a full store, a refusal file) */
byte last_id[N];               /* durable: vms/NAME/last-id */

/* ---- ghosts (not in the code: what the properties speak of) ------------------------- */
byte ck_tag[N * 8];            /* (inc*16 + epoch) a checkpoint was cut for; 0 = never cut */
bool used[8];                  /* an epoch number was started */
bool comm[8];                  /* epoch committed (record durable), pruned or not */
byte g_from[N];                /* the committed epoch a VM's state was restored from */
bool g_paused[N];              /* the guest does not run (restored paused, or restoring) */
bool faults_done;              /* no fault from here on */
bool committed_after;          /* an epoch committed after faults_done */
byte faults;                   /* faults so far */
byte f_ccrash, f_scrash, f_vmfail, f_disc, f_net, f_rec, f_slow;
byte started_after;            /* epochs started after faults_done */
byte nstarted;                 /* epochs started before */

/* scratch, only within one step, and 0 between steps (SCRUB): not `hidden`, whose
 * values pan does not restore when it backtracks over a d_step */
byte hk, hi, he, ha, hm, hj, hx, hy, hq;
mtype hmt;
#define SCRUB hk = 0; hi = 0; he = 0; ha = 0; hm = 0; hj = 0; hx = 0; hy = 0; hq = 0; hmt = 0

/* the properties' assertions; -DSKIP_A .. -DSKIP_E leaves one out, to check the others
 * past a violation of it.  BOUND: the model's own bounds are large enough. */
#ifdef SKIP_A
#define PROP_A(x) skip
#else
#define PROP_A(x) assert(x)
#endif
#ifdef SKIP_B
#define PROP_B(x) skip
#else
#define PROP_B(x) assert(x)
#endif
#ifdef SKIP_C
#define PROP_C(x) skip
#else
#define PROP_C(x) assert(x)
#endif
#ifdef SKIP_D
#define PROP_D(x) skip
#else
#define PROP_D(x) assert(x)
#endif
#ifdef SKIP_E
#define PROP_E(x) skip
#else
#define PROP_E(x) assert(x)
#endif
#define BOUND(x) assert(x)

#ifdef FIX_ATTEMPT
#define REP (r_ep + 16 * attempt)   /* the recovery's messages name epoch and attempt */
#else
#define REP r_ep                    /* Restore/Restored/Resume/Resumed name the epoch only */
#endif
#define EPOCH_OF(x) ((x) % 16)

#define BIT(id) (1 << (id))
#define HAS(m, id) ((store[m] & BIT(id)) != 0)
#define TAG(i, e) ((i) * 16 + (e))
/* a durable record exists (not the one whose directory fsync is still to come) */
#define RECD(e) (rec[e] && !(writing == 2 && ep == e))
#define ANYREC (RECD(1) || RECD(2) || RECD(3) || RECD(4) || RECD(5) || RECD(6))
#define CAN_FAULT(f, max) (!faults_done && faults < F_TOTAL && (f) < (max))
#define M_FAULT(f, max) (m < FAULTY && CAN_FAULT(f, max))

/* The whole cluster has settled: an epoch committed after the faults stopped, the
 * coordinator is idle and every guest runs. */
#define SETTLED (committed_after && phase == IDLE && vm[0] == RUNNING && vm[1] == RUNNING && \
                 vm[2] == RUNNING && !g_paused[0] && !g_paused[1] && !g_paused[2])

/* Every member has read what was sent to it and has no work in the background (a store,
 * an arming waiting for it, a restore).  Once the faults stop, an epoch starts only then:
 * the epochs after the faults are bounded (EA), and a scheduler that let a member lag
 * behind all of them would show the bound, not the protocol (with `--interval` longer
 * than a store, the next epoch finds the last one's work done). */
#define QUIET (empty(toM[0]) && empty(toM[1]) && empty(toM[2]) && \
               !bg[0] && !bg[1] && !bg[2] && slot[0] != ARMING && slot[1] != ARMING && \
               slot[2] != ARMING && !rtask[0] && !rtask[1] && !rtask[2])

ltl live { [] (faults_done -> <> SETTLED) }

/* ===================================================================================== */
/* property (b): removing checkpoint id of member m from its store                        */
/* `retention`: the gc after a commit (Store::gc_keep) may drop checkpoints of pruned     */
/* records (--keep); nothing else may drop a checkpoint that an epoch committed.          */
inline store_remove(m, id, retention) {
  for (hq : 1 .. MAXE) {
    PROP_B(!(rec[hq] && rec_ck[hq * N + m] == id));              /* (b) named by a record */
    PROP_B(retention || !(comm[hq] && rec_ck[hq * N + m] == id)) /* (b) ever committed */
  }
  store[m] = store[m] & ~BIT(id)
}

/* ---- coordinator effects ------------------------------------------------------------ */
inline c_send(m, k, e, a) {    /* Actor::send_one: only over a live connection */
  if
  :: conn[m] && !closing[m] -> BOUND(len(toM[m]) < CAP); toM[m]!k, cinc, e, a
  :: else -> skip               /* no connection, or its peer is gone: lost */
  fi
}

inline c_send_all(k, e, a) {
  c_send(0, k, e, a); c_send(1, k, e, a); c_send(2, k, e, a)
}

inline c_clear_epoch() {
  ep = 0; step = 0; ndur = 0;
  for (hi : 0 .. N - 1) { stage[hi] = 0; cutck[hi] = 0; durck[hi] = 0 };
  skip
}

inline c_clear_recovery() {
  r_ep = 0; r_resuming = false; attempt = 0;
  for (hi : 0 .. N - 1) { tstate[hi] = 0; r_ck[hi] = 0 };
  skip
}

/* phase.rs abort(): Abort to every member, Idle */
inline c_abort() {
  printf("MSC: coordinator aborts epoch %d\n", ep);
  c_send_all(ABORT, ep, 0);
  phase = IDLE;
  c_clear_epoch()
}

/* phase.rs start_recovery(): Restore to every target */
inline c_start_recovery() {
  phase = RECOV; r_resuming = false;
  for (hm : 0 .. N - 1) {
    tstate[hm] = T_RESTORING;
    c_send(hm, RESTORE, REP, r_ck[hm])
  };
  skip
}

/* phase.rs retry(): again from the start, or Halted after the last attempt */
inline c_retry() {
  if
  :: attempt >= ATTEMPTS -> printf("MSC: halted\n"); phase = HALTED; c_clear_recovery()
  :: else -> attempt++; c_start_recovery()
  fi
}

/* Catalog::prune(KEEP): records beyond the newest KEEP go */
inline c_prune() {
  hx = 0;
  for (hj : 0 .. MAXE - 1) {
    if
    :: rec[MAXE - hj] && hx >= KEEP -> rec[MAXE - hj] = false
    :: rec[MAXE - hj] && hx < KEEP -> hx++
    :: else -> skip
    fi
  };
  skip
}

/* Actor::committed_ids(m): m's checkpoints in the newest KEEP records, as a bitmask */
inline c_committed_ids(m, out) {
  out = 0; hx = 0;
  for (hj : 0 .. MAXE - 1) {
    if
    :: rec[MAXE - hj] && hx < KEEP -> out = out | BIT(rec_ck[(MAXE - hj) * N + m]); hx++
    :: else -> skip
    fi
  };
  skip
}

/* Actor::plan(None) then Event::Recover: the last committed epoch (one further back when
 * the last recovery was recent: the latent window is a matter of time, so either) */
inline c_recover() {
  hx = 0; hy = 0;              /* newest and the one before */
  for (hj : 1 .. MAXE) {
    if
    :: rec[hj] -> hy = hx; hx = hj
    :: else -> skip
    fi
  }
  if
  :: hx == 0 -> skip           /* "no committed epoch to recover to" */
  :: else ->
     if
     :: last_recovery && hy != 0 -> hx = hy
     :: true -> skip
     fi;
     last_recovery = true;
     if
     :: phase == EPOCH && step == COMMITTING -> skip   /* refused: the record decides first */
     :: else ->
        if
        :: phase == EPOCH -> c_abort()
        :: else -> skip
        fi;
        printf("MSC: recovery to epoch %d\n", hx);
        r_ep = hx; attempt = 1;
        for (hm : 0 .. N - 1) { r_ck[hm] = rec_ck[hx * N + hm] }
        c_start_recovery()
     fi
  fi
}

/* phase.rs maybe_commit(): every member durable with the checkpoint of its cut */
inline c_maybe_commit() {
#ifdef BAD_COUNT_COMMIT
  if
  :: ndur >= N && step == STORING -> step = COMMITTING; writing = 1
  :: else -> skip
  fi
#else
  if
  :: stage[0] == SDUR && stage[1] == SDUR && stage[2] == SDUR && step == STORING ->
     step = COMMITTING; writing = 1
  :: else -> skip
  fi
#endif
}

/* phase.rs epoch_member(), for a message of this incarnation */
inline c_epoch_member(m, k, e, a) {
  if
  :: k == VMFAILED ->                                      /* no epoch: aborts, unless committing */
     if
     :: step != COMMITTING -> c_abort()
     :: else -> skip
     fi
#ifdef BAD_COUNT_COMMIT
  /* the known-bad coordinator: any Durable counts, whatever its epoch, stage or checkpoint */
  :: k == DURABLE ->
     if
     :: step != COMMITTING -> ndur++; durck[m] = a; c_maybe_commit()
     :: else -> skip
     fi
#endif
  :: else ->
     if
     :: e != ep -> skip                                    /* another epoch: discarded */
     :: e == ep && step == COMMITTING -> skip              /* the record decides */
     :: e == ep && step != COMMITTING ->
        if
        :: k == VOTE && a == 0 -> c_abort()
        :: k == VOTE && a == 1 && stage[m] == ASKED ->
           stage[m] = VOTED;
           if
           :: stage[0] == VOTED && stage[1] == VOTED && stage[2] == VOTED ->
              step = CUTTING; c_send_all(CUT, ep, 0)
           :: else -> skip
           fi
        :: k == CUTDONE && stage[m] == VOTED && step == CUTTING ->
           stage[m] = SCUT; cutck[m] = a;
           if
           :: stage[0] >= SCUT && stage[1] >= SCUT && stage[2] >= SCUT -> step = STORING
           :: else -> skip
           fi
        :: k == DURABLE ->
           if
           :: stage[m] != SCUT -> c_abort()                /* durable without a cut */
           :: stage[m] == SCUT && a != cutck[m] -> c_abort() /* not the checkpoint of its cut */
           :: stage[m] == SCUT && a == cutck[m] -> stage[m] = SDUR; durck[m] = a; c_maybe_commit()
           fi
        :: k == STEPFAILED -> c_abort()
        :: else -> skip                                    /* does not fit its stage */
        fi
     fi
  fi
}

/* phase.rs recovery_member() */
inline c_recovery_member(m, k, e, a) {
  if
  :: k == VMFAILED ->
     if
     :: tstate[m] == T_RESTORING -> skip                   /* its old QEMU stops: expected */
     :: else -> c_retry()
     fi
  :: k != VMFAILED && e != REP -> skip                     /* another epoch */
  :: k != VMFAILED && e == REP ->
     if
     :: k == RESTORED && tstate[m] == T_RESTORING && !r_resuming ->
        tstate[m] = T_RESTORED;
        if
        :: tstate[0] == T_RESTORED && tstate[1] == T_RESTORED && tstate[2] == T_RESTORED ->
           r_resuming = true; c_send_all(RESUME, REP, 0)
        :: else -> skip
        fi
     :: k == RESUMED && tstate[m] == T_RESTORED && r_resuming ->
        tstate[m] = T_RESUMED;
        if
        :: tstate[0] == T_RESUMED && tstate[1] == T_RESUMED && tstate[2] == T_RESUMED ->
           /* Effect::Recovered.  (d): every member runs the state of this one epoch */
           printf("MSC: recovered to epoch %d\n", r_ep);
           for (hm : 0 .. N - 1) {
             PROP_D(g_from[hm] == r_ep);
             PROP_D(vm[hm] == FAILED || !g_paused[hm]);
             health[hm] = H_UP
           }
           phase = IDLE; c_clear_recovery()
        :: else -> skip
        fi
     :: k == STEPFAILED -> c_retry()
     :: else -> skip                                       /* does not fit its state */
     fi
  fi
}

/* Actor::on_input(Input::Msg) */
inline c_recv(m) {
  toC[m]?hmt, hi, he, ha;
  if
  :: hi != cinc -> skip                                    /* another incarnation */
  :: else ->
     if
     :: hmt == VMFAILED ->                                 /* Actor::vm_failed */
        if
        :: health[m] != H_FAILED && phase != RECOV -> health[m] = H_FAILED
        :: else -> skip
        fi
     :: hmt == RESTORED -> pidk[m] = true
     :: else -> skip
     fi;
     if
     :: phase == EPOCH -> c_epoch_member(m, hmt, he, ha)
     :: phase == RECOV -> c_recovery_member(m, hmt, he, ha)
     :: else -> skip                                       /* belongs to no epoch in flight */
     fi
  fi
}

/* Input::Closed of the connection: Event::Disconnected */
inline c_closed(m) {
  closing[m] = false; conn[m] = false;
  if
  :: health[m] == H_UP -> health[m] = H_LOST
  :: else -> skip
  fi;
  if
  :: phase == EPOCH && step != COMMITTING -> c_abort()
  :: else -> skip
  fi
}

/* ---- member effects ------------------------------------------------------------------ */
inline s_send(m, k, e, a) {    /* Agent::send: in the current session */
  if
  :: sess[m] != 0 -> BOUND(len(toC[m]) < CAP); toC[m]!k, sess[m], e, a
  :: else -> skip
  fi
}

inline s_send_for(m, i, k, e, a) {  /* Agent::send_for: only if its incarnation is the session's */
  if
  :: sess[m] != 0 && sess[m] == i -> s_send(m, k, e, a)
  :: else -> skip
  fi
}

inline s_slot_free(m) {
  slot[m] = FREE; s_inc[m] = 0; s_ep[m] = 0; s_ck[m] = 0; s_abt[m] = false
}

inline s_arming(m, i, e) {
  slot[m] = ARMING; s_inc[m] = i; s_ep[m] = e; s_ck[m] = 0; s_abt[m] = false
}

/* SlotEvent::SessionLost */
inline s_session_lost(m) {
  sess[m] = 0;
  if
  :: slot[m] == ARMING -> s_abt[m] = true
  :: slot[m] == ARMED -> prepared[m] = false; s_slot_free(m)
  :: else -> skip
  fi
}

inline flush_in(m) {            /* what was on its way to member m is lost */
  do
  :: nempty(toM[m]) -> toM[m]?_, _, _, _
  :: empty(toM[m]) -> break
  od
}

inline flush_out(m) {           /* what member m sent is lost */
  do
  :: nempty(toC[m]) -> toC[m]?_, _, _, _
  :: empty(toC[m]) -> break
  od
}

/* arming finished: SlotEvent::Armed (checkpoint::prepare reserves the id) */
inline s_arm_done(m) {
  if
  :: s_abt[m] -> s_slot_free(m)                            /* its epoch is gone: dropped */
  :: !s_abt[m] && vm[m] == RUNNING ->
     BOUND(last_id[m] < MAXID);
     last_id[m]++;                                         /* Store::reserve_id */
     s_ck[m] = last_id[m]; slot[m] = ARMED; prepared[m] = true;
     s_send_for(m, s_inc[m], VOTE, s_ep[m], 1)
  :: !s_abt[m] && vm[m] != RUNNING ->                      /* Armed(Err): vote no */
     hi = s_inc[m]; he = s_ep[m]; s_slot_free(m); s_send_for(m, hi, VOTE, he, 0)
  fi
}

/* Agent::on_msg(Prepare).  Arming runs in the background after any store in flight:
 * with none it is taken as done at once (nothing can tell the difference but a
 * message in between, and every message of that epoch comes after the vote) */
inline s_prepare(m, i, e) {
  if
  :: vm[m] != RUNNING || refusing[m] ->                        /* Agent::refusal */
     refusing[m] = false; s_send(m, VOTE, e, 0)
  :: else ->
     if
     :: slot[m] == FREE -> s_arming(m, i, e)
     :: slot[m] == DURABLES -> s_arming(m, i, e)           /* Keep */
     :: slot[m] == ARMED -> prepared[m] = false; s_arming(m, i, e)   /* DropArmed */
     :: slot[m] == STORINGS -> bg_abandoned[m] = true; s_arming(m, i, e) /* AbandonStore */
     :: slot[m] == ARMING -> s_send_for(m, i, VOTE, e, 0)   /* still arming */
     fi;
     if
     :: slot[m] == ARMING && !bg[m] -> s_arm_done(m)
     :: else -> skip
     fi
  fi
}

/* Agent::on_msg(Cut): TakeCut then CutTaken */
inline s_cut(m, i, e) {
  if
  :: slot[m] == ARMED && s_inc[m] == i && s_ep[m] == e ->
     if
     :: prepared[m] && vm[m] == RUNNING ->
        prepared[m] = false;
        ck_tag[m * 8 + s_ck[m]] = TAG(i, e);
        slot[m] = STORINGS;
        s_send_for(m, i, CUTDONE, e, s_ck[m]);
        BOUND(!bg[m]);
        bg[m] = true; bg_inc[m] = i; bg_ep[m] = e; bg_ck[m] = s_ck[m]; bg_abandoned[m] = false
     :: else ->                                            /* the cut fails */
        prepared[m] = false; s_slot_free(m); s_send_for(m, i, STEPFAILED, e, 0)
     fi
  :: else -> s_send_for(m, i, STEPFAILED, e, 0)             /* cut asked while ... */
  fi
}

/* Agent::on_msg(Commit): SlotEvent::Commit, then Store::gc_keep(keep) */
inline s_commit(m, i, e, keep) {
  if
  :: slot[m] == DURABLES && s_inc[m] == i && s_ep[m] == e -> s_slot_free(m)  /* Retire */
  :: else -> skip
  fi;
  if
  :: keep != 0 ->
     hy = 0;                                               /* newest kept */
     for (hk : 1 .. MAXID) {
       if
       :: (keep & BIT(hk)) != 0 -> hy = hk
       :: else -> skip
       fi
     }
     for (hk : 1 .. MAXID) {
       if
       :: HAS(m, hk) && (keep & BIT(hk)) == 0 && hk <= hy -> store_remove(m, hk, true)
       :: else -> skip
       fi
     }
  :: else -> skip
  fi
}

/* Agent::on_msg(Abort): SlotEvent::Abort */
inline s_abort(m, i, e) {
  if
  :: slot[m] == ARMING && s_inc[m] == i && s_ep[m] == e -> s_abt[m] = true
  :: slot[m] == ARMED && s_inc[m] == i && s_ep[m] == e -> prepared[m] = false; s_slot_free(m)
  :: slot[m] == STORINGS && s_inc[m] == i && s_ep[m] == e -> bg_abandoned[m] = true; s_slot_free(m)
  :: slot[m] == DURABLES && s_inc[m] == i && s_ep[m] == e ->
     store_remove(m, s_ck[m], false); s_slot_free(m)       /* Discard */
  :: else -> skip                                          /* ReleaseGate only */
  fi
}

/* Agent::on_msg(Restore): VmEvent::Restore */
inline s_restore(m, i, e, ck) {
  if
#ifdef FIX_ATTEMPT
  :: vm[m] == RESTORING && vm_inc[m] == i && EPOCH_OF(vm_ep[m]) == EPOCH_OF(e) && restore_ck[m] == ck ->
     vm_ep[m] = e                                          /* the restore running answers this attempt */
  :: vm[m] == RESTORING && vm_inc[m] == i && !(EPOCH_OF(vm_ep[m]) == EPOCH_OF(e) && restore_ck[m] == ck) -> skip
#else
  :: vm[m] == RESTORING && vm_inc[m] == i -> skip           /* one restore at a time */
#endif
  :: else ->                                               /* StartRestore (supersedes another incarnation's) */
     vm[m] = RESTORING; vm_inc[m] = i; vm_ep[m] = e; restore_ck[m] = ck; rtask[m] = true;
     prepared[m] = false; g_paused[m] = true
  fi
}

/* Agent::on_msg(Resume): VmEvent::Resume, Cont, VmEvent::Resumed */
inline s_resume(m, i, e) {
  if
  :: vm[m] == PAUSED || vm[m] == RUNNING ->
     if
     :: g_paused[m] -> PROP_D(comm[g_from[m]])             /* (d) resumed from a committed epoch */
     :: else -> skip
     fi;
     vm[m] = RUNNING; g_paused[m] = false; vm_inc[m] = 0; vm_ep[m] = 0;
     s_send_for(m, i, RESUMED, e, 0)
  :: else -> s_send_for(m, i, STEPFAILED, e, 0)             /* cannot resume */
  fi
}

inline s_recv(m) {
  toM[m]?hmt, hi, he, ha;
  if
  :: hi != sess[m] -> skip                                 /* another incarnation */
  :: else ->
     if
     :: hmt == PREPARE -> s_prepare(m, hi, he)
     :: hmt == CUT -> s_cut(m, hi, he)
     :: hmt == COMMIT -> s_commit(m, hi, he, ha)
     :: hmt == ABORT -> s_abort(m, hi, he)
     :: hmt == RESTORE -> s_restore(m, hi, he, ha)
     :: hmt == RESUME -> s_resume(m, hi, he)
     fi
  fi
}

/* Register / Welcome as one step: Actor::on_register on the coordinator's side, then
 * Agent::session/welcome on the sidecar's (nothing else runs in the sidecar between). */
inline s_register(m) {
  c_committed_ids(m, hk);                                  /* Welcome::committed */
  hy = 0;                                                  /* newest committed */
  for (hj : 1 .. MAXID) {
    if
    :: (hk & BIT(hj)) != 0 -> hy = hj
    :: else -> skip
    fi
  }
  he = 0;                                                  /* in flight: Stage::Cut/Durable */
  if
  :: phase == EPOCH && stage[m] == SCUT -> he = cutck[m]
  :: phase == EPOCH && stage[m] == SDUR -> he = durck[m]
  :: else -> skip
  fi;
  ha = 0;                                                  /* Welcome::aborted */
  for (hj : 1 .. MAXID) {
#ifdef BAD_DISCARD
    if
    :: HAS(m, hj) && (hk & BIT(hj)) == 0 -> ha = ha | BIT(hj)
    :: else -> skip
    fi
#else
    if
    :: HAS(m, hj) && hj > hy && hj != he -> ha = ha | BIT(hj)
    :: else -> skip
    fi
#endif
  }
  /* the sidecar */
  sess[m] = cinc;
  if                                                       /* SlotEvent::Welcome */
  :: slot[m] == DURABLES && (hk & BIT(s_ck[m])) != 0 -> s_slot_free(m)    /* Retire */
  :: slot[m] == DURABLES && (ha & BIT(s_ck[m])) != 0 -> s_slot_free(m)    /* Discard (below) */
  :: else -> skip
  fi;
  for (hj : 1 .. MAXID) {                                  /* exactly the aborted ones */
    if
    :: (ha & BIT(hj)) != 0 && HAS(m, hj) -> store_remove(m, hj, false)
    :: else -> skip
    fi
  }
  /* the coordinator */
  conn[m] = true;
  if
  :: vm[m] == RUNNING || vm[m] == PAUSED -> pidk[m] = true  /* Register::pid */
  :: else -> skip
  fi;
  if
  :: health[m] == H_UNKNOWN || health[m] == H_LOST -> health[m] = H_UP
  :: else -> skip
  fi;
  if
  :: phase == RECOV ->                                     /* Event::Registered */
     if
     :: tstate[m] == T_RESTORING -> c_send(m, RESTORE, REP, r_ck[m])
     :: tstate[m] == T_RESTORED && r_resuming -> c_send(m, RESUME, REP, 0)
     :: else -> skip
     fi
  :: else -> skip
  fi;
  /* the sidecar again, after Welcome */
  if
  :: vm[m] == FAILED -> s_send(m, VMFAILED, 0, 0)
  :: (vm[m] == RESTORING || vm[m] == PAUSED) && vm_inc[m] != cinc -> s_send(m, VMFAILED, 0, 0)
  :: else -> skip
  fi
}

/* ===================================================================================== */
proctype Coordinator() {
end:
  do
  :: d_step { nempty(toC[0]) -> c_recv(0); SCRUB }
  :: d_step { nempty(toC[1]) -> c_recv(1); SCRUB }
  :: d_step { nempty(toC[2]) -> c_recv(2); SCRUB }
  /* Input::Closed comes after every message of its connection */
  :: d_step { closing[0] && empty(toC[0]) -> c_closed(0); SCRUB }
  :: d_step { closing[1] && empty(toC[1]) -> c_closed(1); SCRUB }
  :: d_step { closing[2] && empty(toC[2]) -> c_closed(2); SCRUB }

  /* Actor::start_epoch (a periodic or asked-for epoch) */
  :: d_step {
       phase == IDLE && conn[0] && conn[1] && conn[2] &&
       health[0] == H_UP && health[1] == H_UP && health[2] == H_UP &&
       ((!faults_done && nstarted < EF) || (faults_done && started_after < EA && QUIET)) ->
       if
       :: faults_done -> started_after++
       :: else -> nstarted++
       fi;
       BOUND(next_epoch <= MAXE);
       ep = next_epoch;
       PROP_C(!used[ep]);                                  /* (c) an epoch number is used once */
       used[ep] = true;
       next_epoch = ep + 1;                                /* persisted before Prepare */
       printf("MSC: epoch %d starts (incarnation %d)\n", ep, cinc);
       phase = EPOCH; step = PREPARING;
       for (hm : 0 .. N - 1) { stage[hm] = ASKED; cutck[hm] = 0; durck[hm] = 0 }
       c_send_all(PREPARE, ep, 0);
       SCRUB
     }

  /* Actor::on_tick: a failed VM (or one found dead on evidence) starts a recovery.  While
   * the record is written it is refused, but Actor::recover has set last_recovery: the
   * model takes that once (more changes nothing) */
  :: atomic {
       (health[0] == H_FAILED || health[1] == H_FAILED || health[2] == H_FAILED) &&
       (phase == IDLE || (phase == EPOCH && (step != COMMITTING || !last_recovery))) ->
       c_recover();
       SCRUB
     }
  /* Actor::detect: QEMU gone (its pid known here) while its sidecar is not connected */
  :: d_step {
       (vm[0] == FAILED && pidk[0] && !conn[0] && health[0] != H_FAILED && phase != RECOV) ->
       health[0] = H_FAILED;
       SCRUB
     }
  :: d_step {
       (vm[1] == FAILED && pidk[1] && !conn[1] && health[1] != H_FAILED && phase != RECOV) ->
       health[1] = H_FAILED;
       SCRUB
     }
  :: d_step {
       (vm[2] == FAILED && pidk[2] && !conn[2] && health[2] != H_FAILED && phase != RECOV) ->
       health[2] = H_FAILED;
       SCRUB
     }

  /* Catalog::commit, off the actor: link (the record exists from here) ... */
  :: d_step {
       writing == 1 ->
       PROP_C(!rec[ep]);                                   /* (c) never overwritten */
       for (hm : 0 .. N - 1) {
         /* (a) each member's checkpoint is the one it cut for this epoch of this
          * incarnation, is the one the coordinator took its cut from, and is durable */
         PROP_A(ck_tag[hm * 8 + durck[hm]] == TAG(cinc, ep));
         PROP_A(durck[hm] == cutck[hm]);
         PROP_B(HAS(hm, durck[hm]));
         rec_ck[ep * N + hm] = durck[hm]
       }
       /* (e) no epoch commits while a rolled-back guest is still paused */
       PROP_E(!g_paused[0] && !g_paused[1] && !g_paused[2]);
       rec[ep] = true; comm[ep] = true; writing = 2;
       printf("MSC: record of epoch %d linked\n", ep);
       SCRUB
     }
  /* ... or the temp file cannot be written: RecordFailed */
  :: d_step {
       writing == 1 && CAN_FAULT(f_rec, F_REC) -> faults++; f_rec++;
       writing = 0; c_abort();
       SCRUB
     }
  /* ... then the directory's fsync: RecordWritten, Effect::Committed */
  :: d_step {
       writing == 2 ->
       writing = 0;
       printf("MSC: epoch %d committed\n", ep);
       if
       :: faults_done -> committed_after = true
       :: else -> skip
       fi;
       c_prune();
       for (hm : 0 .. N - 1) {
         c_committed_ids(hm, hk);
         c_send(hm, COMMIT, ep, hk)
       }
       phase = IDLE; c_clear_epoch();
       SCRUB
     }
  /* ... or it fails: the record is removed, RecordFailed */
  :: d_step {
       writing == 2 && CAN_FAULT(f_rec, F_REC) -> faults++; f_rec++;
       rec[ep] = false; comm[ep] = false; writing = 0; c_abort();
       SCRUB
     }

  /* a step's deadline passes: when nothing else can happen, or early (a fault) */
  :: atomic {
       timeout && ((phase == EPOCH && step != COMMITTING) || phase == RECOV) ->
       if
       :: phase == EPOCH -> c_abort()
       :: else -> c_retry()
       fi;
       SCRUB
     }
  :: atomic {
       CAN_FAULT(f_slow, F_SLOW) && ((phase == EPOCH && step != COMMITTING) || phase == RECOV) ->
       faults++; f_slow++;
       if
       :: phase == EPOCH -> c_abort()
       :: else -> c_retry()
       fi;
       SCRUB
     }

  /* the coordinator is SIGKILLed and restarted on its state directory (server.rs run) */
  :: atomic {
       CAN_FAULT(f_ccrash, F_CCRASH) -> faults++; f_ccrash++;
       printf("MSC: coordinator crash\n");
       if
       :: writing == 2 ->                                  /* linked, not yet fsynced */
          if
          :: skip                                          /* the record survives */
          :: rec[ep] = false; comm[ep] = false             /* or not (power loss) */
          fi
       :: else -> skip
       fi;
       writing = 0;
       cinc++;
       c_prune();
       phase = IDLE; c_clear_epoch(); c_clear_recovery(); last_recovery = false;
       for (hm : 0 .. N - 1) {
         conn[hm] = false; closing[hm] = false; health[hm] = H_UNKNOWN; pidk[hm] = false;
         flush_in(hm); flush_out(hm);
         s_session_lost(hm)
       };
       SCRUB
     }
#ifndef SAFETY_ONLY
  :: atomic { !faults_done -> faults_done = true; printf("MSC: faults stop\n"); SCRUB }
#endif
  od
}

proctype Member(byte m) {
end:
  do
  :: d_step { nempty(toM[m]) && sess[m] != 0 -> s_recv(m); SCRUB }
  :: d_step { sess[m] == 0 && !conn[m] && !closing[m] -> s_register(m); SCRUB }

  /* arming finished after the store it waited for */
  :: d_step { slot[m] == ARMING && !bg[m] -> s_arm_done(m); SCRUB }

  /* a store finished: Done::Stored */
  :: d_step {
       bg[m] ->
       bg[m] = false;
       if
       :: bg_abandoned[m] ->                               /* stored after its epoch ended: discarded */
          bg_abandoned[m] = false; ck_tag[m * 8 + bg_ck[m]] = 0
       :: else ->
          store[m] = store[m] | BIT(bg_ck[m]);             /* Store::commit: the manifest */
          if
          :: slot[m] == STORINGS && s_inc[m] == bg_inc[m] && s_ep[m] == bg_ep[m] ->
             slot[m] = DURABLES;
             s_send_for(m, bg_inc[m], DURABLE, bg_ep[m], bg_ck[m])
          :: else -> skip
          fi
       fi;
       bg_inc[m] = 0; bg_ep[m] = 0; bg_ck[m] = 0;
       SCRUB
     }

  /* a restore finished (after a store in flight): Done::Restored */
  :: d_step {
       rtask[m] && !bg[m] ->
       rtask[m] = false;
       if
       :: vm[m] == RESTORING && HAS(m, restore_ck[m]) ->
          vm[m] = PAUSED; g_from[m] = EPOCH_OF(vm_ep[m]); g_paused[m] = true;
          s_send_for(m, vm_inc[m], RESTORED, vm_ep[m], 0)
       :: vm[m] == RESTORING && !HAS(m, restore_ck[m]) ->  /* no such checkpoint */
          vm[m] = FAILED; s_send_for(m, vm_inc[m], STEPFAILED, vm_ep[m], 0);
          vm_inc[m] = 0; vm_ep[m] = 0
       :: else -> skip
       fi;
       restore_ck[m] = 0;
       SCRUB
     }

  /* a refusal to come: the store is short of room (Agent::refusal) */
  :: atomic { !refusing[m] && M_FAULT(f_slow, F_SLOW) -> faults++; f_slow++; refusing[m] = true; SCRUB }

  /* ---- faults ---- */
  /* QEMU dies (only once an epoch committed: before, nothing could roll it back) */
  :: atomic {
       (vm[m] == RUNNING || vm[m] == PAUSED) && ANYREC &&
       M_FAULT(f_vmfail, F_VMFAIL) -> faults++; f_vmfail++;
       printf("MSC: VM %d fails\n", m);
       vm[m] = FAILED; vm_inc[m] = 0; vm_ep[m] = 0;
       s_send(m, VMFAILED, 0, 0);
       SCRUB
     }
  /* the sidecar is SIGKILLed and restarted: its volatile state goes, its store stays */
  :: atomic {
       M_FAULT(f_scrash, F_SCRASH) -> faults++; f_scrash++;
       printf("MSC: sidecar %d crash\n", m);
       flush_in(m);      /* what it sent before dying still reaches the coordinator */
       if
       :: conn[m] -> closing[m] = true
       :: else -> skip
       fi;
       sess[m] = 0; s_slot_free(m); prepared[m] = false;
       if                                                  /* a store in flight dies: no manifest */
       :: bg[m] -> ck_tag[m * 8 + bg_ck[m]] = 0
       :: else -> skip
       fi;
       bg[m] = false; bg_abandoned[m] = false; bg_inc[m] = 0; bg_ep[m] = 0; bg_ck[m] = 0;
       rtask[m] = false; restore_ck[m] = 0; refusing[m] = false;
       if
       :: vm[m] == RESTORING ->                            /* the restore died with it */
          if
          :: vm[m] = FAILED                                /* no QEMU left */
          :: vm[m] = RUNNING; g_from[m] = EPOCH_OF(vm_ep[m]) /* or the new one, paused */
          fi
       :: vm[m] == PAUSED -> vm[m] = RUNNING               /* attached: the guest stays paused */
       :: else -> skip
       fi;
       vm_inc[m] = 0; vm_ep[m] = 0;
       SCRUB
     }
  /* the connection drops (or the sidecar is silent and its connection is dropped) */
  :: atomic {
       sess[m] != 0 && conn[m] && M_FAULT(f_disc, F_DISC) -> faults++; f_disc++;
       printf("MSC: connection of %d drops\n", m);
       flush_in(m); flush_out(m);
       closing[m] = true;
       s_session_lost(m);
       SCRUB
     }
  /* one message lost, duplicated or overtaken by the next (not with TCP) */
  :: atomic {
       nempty(toM[m]) && M_FAULT(f_net, F_NET) -> faults++; f_net++;
       toM[m]?hmt, hi, he, ha;
       if
       :: skip                                             /* lost */
       :: toM[m]!hmt, hi, he, ha                           /* overtaken: to the back */
       :: len(toM[m]) < CAP - 1 -> toM[m]!hmt, hi, he, ha; toM[m]!hmt, hi, he, ha  /* duplicated */
       fi;
       SCRUB
     }
  :: atomic {
       nempty(toC[m]) && M_FAULT(f_net, F_NET) -> faults++; f_net++;
       toC[m]?hmt, hi, he, ha;
       if
       :: skip
       :: toC[m]!hmt, hi, he, ha
       :: len(toC[m]) < CAP - 1 -> toC[m]!hmt, hi, he, ha; toC[m]!hmt, hi, he, ha
       fi;
       SCRUB
     }
  od
}

init {
  atomic {
    /* the coordinator's first start; the members registered once before (the
     * membership is persisted), each VM runs, no checkpoint yet */
    for (hm : 0 .. N - 1) { health[hm] = H_UNKNOWN; vm[hm] = RUNNING }
    run Coordinator();
    run Member(0);
    run Member(1);
    run Member(2)
  };
  skip
}
