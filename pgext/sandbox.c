/*-------------------------------------------------------------------------
 *
 * sandbox.c
 *		The redo child's sandbox.
 *
 * A redo child replays WAL written by tenants through PostgreSQL's redo
 * code, which is not hardened against hostile input, so the child must be
 * assumed taken over once it has read a request.  Before it reads the first
 * one (start-up has then opened everything it needs from outside its data
 * directory) it gives up, for good:
 *
 *	- resources: address space, file size and open files are capped, no core
 *	  dumps (rlimits, soft = hard, so they cannot be raised again);
 *	- its memory: not dumpable, so no process of its uid may read it through
 *	  /proc or ptrace it;
 *	- the file system (Landlock): read and write inside its own data
 *	  directory, read PostgreSQL's installation and this module, nothing
 *	  else.  From ABI 4 on TCP bind/connect are denied, from ABI 6 on signals
 *	  and abstract Unix sockets cannot leave the sandbox;
 *	- system calls (seccomp, with libseccomp): an allow-list of what redo,
 *	  the shutdown checkpoint and the local data path need.  Anything else
 *	  kills the process: no socket of its own, no exec, no fork, no ptrace,
 *	  signals only to itself, no executable mappings.
 *
 * walredod.sandbox says what happens when the kernel lacks seccomp or
 * Landlock: "required" (the default) ends the child with an error, and
 * "best_effort" goes on with a warning.  "off" skips the sandbox.  The child
 * reports what is in force in one LOG line starting "walredod: sandbox in
 * force:", which the parent keeps.
 *
 * The probes (walredod.sandbox_probe) make the sandboxed child attempt
 * forbidden actions when a request names walredod.sandbox_probe_relnode;
 * tests and "walredod doctor" use them to see the sandbox hold.  Only the
 * parent sets GUCs (on the command line), and a probe can only attempt what
 * the sandbox already refuses.
 *
 * Copyright (c) 2026, the walredod developers.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/landlock.h>

#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/pg_shmem.h"
#include "utils/guc.h"

#include "sandbox.h"

/*
 * Landlock ABI facts newer than the oldest headers we build with (Debian 12
 * ships those of Linux 6.1, ABI 2).  The values are the kernel's UAPI.
 */
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE			(1ULL << 14)	/* ABI 3 */
#endif
#ifndef LANDLOCK_ACCESS_FS_IOCTL_DEV
#define LANDLOCK_ACCESS_FS_IOCTL_DEV		(1ULL << 15)	/* ABI 5 */
#endif
#ifndef LANDLOCK_ACCESS_NET_BIND_TCP
#define LANDLOCK_ACCESS_NET_BIND_TCP		(1ULL << 0) /* ABI 4 */
#define LANDLOCK_ACCESS_NET_CONNECT_TCP		(1ULL << 1)
#endif
#ifndef LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
#define LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0) /* ABI 6 */
#define LANDLOCK_SCOPE_SIGNAL				(1ULL << 1)
#endif
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif

/* The ruleset attribute as of ABI 6; older kernels are given a prefix of it. */
typedef struct LandlockRulesetAttr
{
	uint64		handled_access_fs;
	uint64		handled_access_net;
	uint64		scoped;
} LandlockRulesetAttr;

/* Rights that apply to a file (not a directory) in a rule. */
#define LL_FILE_RIGHTS \
	(LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE | \
	 LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_TRUNCATE | \
	 LANDLOCK_ACCESS_FS_IOCTL_DEV)
#define LL_READ (LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR)
/* Inside its own data directory: files and directories, nothing special. */
#define LL_DATADIR \
	(LL_READ | LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_TRUNCATE | \
	 LANDLOCK_ACCESS_FS_REMOVE_DIR | LANDLOCK_ACCESS_FS_REMOVE_FILE | \
	 LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG | \
	 LANDLOCK_ACCESS_FS_REFER)

typedef enum SandboxMode
{
	SANDBOX_OFF,
	SANDBOX_BEST_EFFORT,
	SANDBOX_REQUIRED
} SandboxMode;

static const struct config_enum_entry sandbox_mode_options[] = {
	{"off", SANDBOX_OFF, false},
	{"best_effort", SANDBOX_BEST_EFFORT, false},
	{"required", SANDBOX_REQUIRED, false},
	{NULL, 0, false}
};

/* GUCs, all set by the parent on the command line. */
static int	sandbox_mode = SANDBOX_REQUIRED;
static int	sandbox_address_space_mb = 1024;
static char *sandbox_probe_actions = NULL;
static int	sandbox_probe_relnode = 0;

/*
 * Open files beyond PostgreSQL's max_safe_fds: what fd.c reserves for itself
 * (NUM_RESERVED_FDS there, 10) and the local data path's connections.
 */
#define EXTRA_OPEN_FILES 74

static bool in_sandbox = false;


void
walredod_sandbox_define_gucs(void)
{
	DefineCustomEnumVariable("walredod.sandbox",
							 "What to do when the kernel cannot sandbox the redo child.",
							 "required: refuse to serve; best_effort: serve with a warning; off: no sandbox.",
							 &sandbox_mode,
							 SANDBOX_REQUIRED,
							 sandbox_mode_options,
							 PGC_SU_BACKEND,
							 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("walredod.sandbox_address_space_mb",
							"Address space limit of the sandboxed redo child.",
							NULL,
							&sandbox_address_space_mb,
							1024, 128, 1024 * 1024,
							PGC_SU_BACKEND,
							GUC_UNIT_MB,
							NULL, NULL, NULL);
	DefineCustomStringVariable("walredod.sandbox_probe",
							   "Forbidden actions the sandboxed child attempts (comma-separated), for checks of the sandbox.",
							   "read:PATH, write:PATH, list:PATH, socket, signal:PID, exec:PATH.",
							   &sandbox_probe_actions,
							   "",
							   PGC_SU_BACKEND,
							   0,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("walredod.sandbox_probe_relnode",
							"Relation whose requests run the sandbox probes (0: none).",
							NULL,
							&sandbox_probe_relnode,
							0, 0, INT_MAX,
							PGC_SU_BACKEND,
							0,
							NULL, NULL, NULL);
}

/*
 * A sandbox layer could not be set up: an error when it is required, else a
 * warning.  Returns to the caller only in the second case.
 */
static void
layer_unavailable(const char *layer, const char *detail)
{
	ereport(sandbox_mode == SANDBOX_REQUIRED ? FATAL : WARNING,
			(errcode(ERRCODE_SYSTEM_ERROR),
			 errmsg("walredod: the redo child's sandbox lacks %s: %s", layer, detail),
			 sandbox_mode == SANDBOX_REQUIRED ?
			 errhint("Run on a kernel with seccomp and Landlock, or set engine.sandbox = \"best_effort\" to serve without them.") :
			 errhint("engine.sandbox = \"best_effort\": serving without it.")));
}

/* Cap a resource for good: the hard limit too, so it cannot be raised. */
static void
set_limit(int resource, const char *name, rlim_t value)
{
	struct rlimit limit = {value, value};

	if (setrlimit(resource, &limit) < 0)
		ereport(FATAL,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("walredod: could not set the redo child's %s limit: %m", name)));
}

static void
limit_resources(rlim_t *nofile)
{
	/*
	 * PostgreSQL's files stay below max_safe_fds (a single-user backend keeps
	 * its default, 48) plus what it reserves for itself; the local data
	 * path's connections come on top.
	 */
	*nofile = max_safe_fds + EXTRA_OPEN_FILES;

	set_limit(RLIMIT_CORE, "core file size", 0);
	set_limit(RLIMIT_NOFILE, "open files", *nofile);
	/* A relation segment (1GB) is the largest file redo writes. */
	set_limit(RLIMIT_FSIZE, "file size", (rlim_t) RELSEG_SIZE * BLCKSZ);
	set_limit(RLIMIT_AS, "address space", (rlim_t) sandbox_address_space_mb * 1024 * 1024);
	/* No new processes (seccomp refuses fork too). */
	set_limit(RLIMIT_NPROC, "processes", 0);
}

/* Allow 'rights' beneath 'path' (skipped when the path does not exist). */
static bool
landlock_allow(int ruleset_fd, const char *path, uint64 rights, uint64 handled)
{
	struct landlock_path_beneath_attr rule;
	struct stat st;
	int			fd;
	int			rc;

	fd = open(path, O_PATH | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT;
	if (fstat(fd, &st) == 0 && !S_ISDIR(st.st_mode))
		rights &= LL_FILE_RIGHTS;
	rule.allowed_access = rights & handled;
	rule.parent_fd = fd;
	rc = syscall(SYS_landlock_add_rule, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, &rule, 0);
	close(fd);
	return rc == 0;
}

/* The directory holding a path (a copy). */
static char *
parent_dir(const char *path)
{
	char	   *dir = pstrdup(path);

	get_parent_directory(dir);
	return dir;
}

/*
 * Landlock: the data directory read-write, PostgreSQL's installation and
 * this module read-only.  Returns the ABI version in force, 0 for none.
 */
static int
enter_landlock(void)
{
	LandlockRulesetAttr attr = {0};
	size_t		attr_size;
	int			abi;
	int			ruleset_fd;
	char		share_path[MAXPGPATH];
	char	   *install_dir;
	Dl_info		module;

	abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
	if (abi < 1)
	{
		layer_unavailable("Landlock", errno == ENOSYS || errno == EOPNOTSUPP ?
						  "the kernel has no Landlock, or it is disabled" : strerror(errno));
		return 0;
	}

	/* Every right this ABI knows is handled, so whatever is not granted is denied. */
	attr.handled_access_fs = (LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1;
	if (abi >= 2)
		attr.handled_access_fs |= LANDLOCK_ACCESS_FS_REFER;
	if (abi >= 3)
		attr.handled_access_fs |= LANDLOCK_ACCESS_FS_TRUNCATE;
	if (abi >= 5)
		attr.handled_access_fs |= LANDLOCK_ACCESS_FS_IOCTL_DEV;
	attr_size = sizeof(uint64);
	if (abi >= 4)
	{
		attr.handled_access_net = LANDLOCK_ACCESS_NET_BIND_TCP | LANDLOCK_ACCESS_NET_CONNECT_TCP;
		attr_size = 2 * sizeof(uint64);
	}
	if (abi >= 6)
	{
		attr.scoped = LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL;
		attr_size = sizeof(LandlockRulesetAttr);
	}

	ruleset_fd = syscall(SYS_landlock_create_ruleset, &attr, attr_size, 0);
	if (ruleset_fd < 0)
	{
		layer_unavailable("Landlock", strerror(errno));
		return 0;
	}

	/* /usr/lib/postgresql/15 from .../bin/postgres; the share directory; us. */
	install_dir = parent_dir(my_exec_path);
	get_parent_directory(install_dir);
	get_share_path(my_exec_path, share_path);
	if (!landlock_allow(ruleset_fd, DataDir, LL_DATADIR, attr.handled_access_fs) ||
		!landlock_allow(ruleset_fd, install_dir, LL_READ, attr.handled_access_fs) ||
		!landlock_allow(ruleset_fd, pkglib_path, LL_READ, attr.handled_access_fs) ||
		!landlock_allow(ruleset_fd, share_path, LL_READ, attr.handled_access_fs) ||
		(dladdr((void *) walredod_sandbox_enter, &module) != 0 && module.dli_fname &&
		 !landlock_allow(ruleset_fd, module.dli_fname, LANDLOCK_ACCESS_FS_READ_FILE,
						 attr.handled_access_fs)))
	{
		int			save_errno = errno;

		close(ruleset_fd);
		errno = save_errno;
		layer_unavailable("Landlock", psprintf("could not add a rule: %m"));
		return 0;
	}

	if (syscall(SYS_landlock_restrict_self, ruleset_fd, 0) < 0)
	{
		int			save_errno = errno;

		close(ruleset_fd);
		errno = save_errno;
		layer_unavailable("Landlock", psprintf("could not enforce the ruleset: %m"));
		return 0;
	}
	close(ruleset_fd);
	return abi;
}

/* Add one allow rule; a call this architecture lacks is skipped. */
static void
allow(scmp_filter_ctx ctx, int *nallowed, const char *name, unsigned int nargs,
	  const struct scmp_arg_cmp *args)
{
	int			nr = seccomp_syscall_resolve_name(name);
	int			rc;

	if (nr == __NR_SCMP_ERROR)
		return;
	rc = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, nargs, args);
	if (rc < 0)
		ereport(FATAL,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("walredod: could not add the seccomp rule for %s: %s", name, strerror(-rc))));
	(*nallowed)++;
}

#define ALLOW(name) allow(ctx, &nallowed, (name), 0, NULL)
#define ALLOW_IF(name, cmp) \
	do { \
		struct scmp_arg_cmp cmp_ = (cmp); \
		allow(ctx, &nallowed, (name), 1, &cmp_); \
	} while (0)

/*
 * The system calls a sandboxed child may make, found by tracing the redo
 * test suites and the shutdown checkpoint.  Returns how many rules were
 * added, 0 when seccomp is unavailable.
 */
static int
enter_seccomp(int listen_fd)
{
	scmp_filter_ctx ctx;
	int			nallowed = 0;
	int			rc;
	pid_t		self = getpid();
	int			shmid = shmget((key_t) UsedShmemSegID, 0, 0);

	ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
	if (ctx == NULL)
	{
		layer_unavailable("seccomp", "seccomp_init failed");
		return 0;
	}

	/* Pipes, the local data path's connections, and relation files. */
	ALLOW("read");
	ALLOW("readv");
	ALLOW("pread64");
	ALLOW("preadv");
	ALLOW("write");
	ALLOW("writev");			/* glibc's fatal messages */
	ALLOW("pwrite64");
	ALLOW("pwritev");
	ALLOW("lseek");
	ALLOW("close");
	ALLOW("poll");
	ALLOW("ppoll");

	/*
	 * fcntl for descriptor flags and file locks only: F_SETOWN with O_ASYNC
	 * would have the kernel signal any process of our uid for us.
	 */
	{
		static const int fcntl_commands[] = {
			F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL,
			F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW,
		};

		for (int i = 0; i < lengthof(fcntl_commands); i++)
			ALLOW_IF("fcntl", SCMP_A1(SCMP_CMP_EQ, (scmp_datum_t) fcntl_commands[i]));
	}
	if (listen_fd >= 0)
	{
		ALLOW_IF("accept4", SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t) listen_fd));
		ALLOW_IF("accept", SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t) listen_fd));
	}
	/* recv() and send() on a connection: no address, so only to its peer. */
	ALLOW_IF("recvfrom", SCMP_A4(SCMP_CMP_EQ, 0));
	ALLOW_IF("sendto", SCMP_A4(SCMP_CMP_EQ, 0));
	ALLOW("shutdown");

	/* Files, inside the data directory as Landlock has it. */
	ALLOW("open");
	ALLOW("openat");
	ALLOW("stat");
	ALLOW("fstat");
	ALLOW("lstat");
	ALLOW("newfstatat");
	ALLOW("statx");
	ALLOW("access");
	ALLOW("faccessat");
	ALLOW("faccessat2");
	ALLOW("readlink");
	ALLOW("readlinkat");
	ALLOW("getdents64");
	ALLOW("ftruncate");
	ALLOW("fallocate");
	ALLOW("fsync");
	ALLOW("fdatasync");
	ALLOW("sync_file_range");
	ALLOW("rename");
	ALLOW("renameat");
	ALLOW("renameat2");
	ALLOW("unlink");
	ALLOW("unlinkat");
	ALLOW("mkdir");
	ALLOW("mkdirat");
	ALLOW("rmdir");

	/* Memory, never executable. */
	ALLOW("brk");
	ALLOW_IF("mmap", SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
	ALLOW_IF("mprotect", SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
	ALLOW("munmap");
	ALLOW("mremap");
	ALLOW("madvise");
	ALLOW("futex");
	/*
	 * Leaving the main shared memory segment at exit (its id from its key);
	 * attaching or removing any other is refused.
	 */
	ALLOW("shmdt");
	if (shmid >= 0)
		ALLOW_IF("shmctl", SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t) shmid));

	/* Signals: handlers, masks, timeouts; sending only to ourselves (abort()). */
	ALLOW("rt_sigaction");
	ALLOW("rt_sigprocmask");
	ALLOW("rt_sigreturn");
	ALLOW("sigaltstack");
	ALLOW("setitimer");
	ALLOW("getitimer");
	ALLOW_IF("kill", SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t) self));
	ALLOW_IF("tkill", SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t) self));
	ALLOW_IF("tgkill", SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t) self));

	/* Time, waiting, identity, the end. */
	ALLOW("clock_gettime");
	ALLOW("clock_getres");
	ALLOW("gettimeofday");
	ALLOW("time");
	ALLOW("nanosleep");
	ALLOW("clock_nanosleep");
	ALLOW("select");
	ALLOW("pselect6");
	ALLOW("epoll_create1");
	ALLOW("epoll_ctl");
	ALLOW("epoll_wait");
	ALLOW("epoll_pwait");
	ALLOW("sched_yield");
	ALLOW("getrusage");
	ALLOW("getpid");
	ALLOW("gettid");
	ALLOW("getppid");
	ALLOW("getuid");
	ALLOW("geteuid");
	ALLOW("getgid");
	ALLOW("getegid");
	ALLOW("restart_syscall");
	ALLOW("exit");
	ALLOW("exit_group");

	/*
	 * The filter tests rules in priority order: the calls of every request
	 * first, so they pay the fewest comparisons.
	 */
	seccomp_syscall_priority(ctx, SCMP_SYS(read), 255);
	seccomp_syscall_priority(ctx, SCMP_SYS(write), 254);
	seccomp_syscall_priority(ctx, SCMP_SYS(pread64), 253);
	seccomp_syscall_priority(ctx, SCMP_SYS(pwrite64), 252);
	seccomp_syscall_priority(ctx, SCMP_SYS(ppoll), 251);
	seccomp_syscall_priority(ctx, SCMP_SYS(poll), 250);

	/* no_new_privs is set already (Landlock needs it too). */
	seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
	rc = seccomp_load(ctx);
	seccomp_release(ctx);
	if (rc < 0)
	{
		layer_unavailable("seccomp", psprintf("could not load the filter: %s", strerror(-rc)));
		return 0;
	}
	return nallowed;
}

void
walredod_sandbox_enter(int listen_fd)
{
	rlim_t		nofile;
	int			landlock_abi;
	int			seccomp_rules;

	if (sandbox_mode == SANDBOX_OFF)
	{
		ereport(LOG,
				(errmsg("walredod: sandbox in force: none (walredod.sandbox = off)")));
		return;
	}

	limit_resources(&nofile);
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 ||
		prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		ereport(FATAL,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("walredod: could not make the redo child undumpable and without new privileges: %m")));

	landlock_abi = enter_landlock();
	/* Last: from here on, every call outside the list is fatal. */
	seccomp_rules = enter_seccomp(listen_fd);
	in_sandbox = true;

	ereport(LOG,
			(errmsg("walredod: sandbox in force: seccomp=%s landlock=%s dumpable=0 no_new_privs=1 "
					"nofile=%lu fsize_mb=%d as_mb=%d core=0 nproc=0",
					seccomp_rules > 0 ? psprintf("kill-unlisted(%d)", seccomp_rules) : "none",
					landlock_abi > 0 ? psprintf("abi%d", landlock_abi) : "none",
					(unsigned long) nofile, (int) ((RELSEG_SIZE * (Size) BLCKSZ) >> 20),
					sandbox_address_space_mb)));
}

/* One probe: attempt an action the sandbox refuses and say what happened. */
static void
run_probe(const char *action)
{
	const char *arg = strchr(action, ':');
	int			rc = -1;

	arg = arg ? arg + 1 : "";
	/* Said before trying, as the attempt may be the child's last act. */
	ereport(LOG, (errmsg("walredod: sandbox probe %s: trying", action)));
	errno = 0;
	if (strncmp(action, "read:", 5) == 0)
		rc = open(arg, O_RDONLY | O_CLOEXEC);
	else if (strncmp(action, "write:", 6) == 0)
		rc = open(arg, O_WRONLY | O_APPEND | O_CLOEXEC);
	else if (strncmp(action, "list:", 5) == 0)
		rc = open(arg, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	else if (strcmp(action, "socket") == 0)
		rc = socket(AF_UNIX, SOCK_STREAM, 0);
	else if (strcmp(action, "fcntl-setown") == 0)
		rc = fcntl(STDIN_FILENO, F_SETOWN, (int) getppid());
	else if (strncmp(action, "signal:", 7) == 0)
		rc = kill((pid_t) atoi(arg), 0);
	else if (strncmp(action, "exec:", 5) == 0)
	{
		char	   *argv[] = {(char *) arg, NULL};

		rc = execv(arg, argv);
	}
	else
	{
		ereport(LOG, (errmsg("walredod: sandbox probe %s: unknown probe", action)));
		return;
	}
	if (rc >= 0)
	{
		ereport(LOG, (errmsg("walredod: sandbox probe %s: allowed", action)));
		if (strncmp(action, "signal:", 7) != 0 && strcmp(action, "fcntl-setown") != 0)
			close(rc);
	}
	else
		ereport(LOG, (errmsg("walredod: sandbox probe %s: denied (%m)", action)));
}

void
walredod_sandbox_probe(Oid relnode)
{
	char	   *actions;
	char	   *action;
	char	   *save;

	if (sandbox_probe_relnode == 0 || relnode != (Oid) sandbox_probe_relnode ||
		sandbox_probe_actions == NULL)
		return;
	actions = pstrdup(sandbox_probe_actions);
	for (action = strtok_r(actions, ",", &save); action; action = strtok_r(NULL, ",", &save))
		run_probe(action);
	pfree(actions);
	ereport(LOG,
			(errmsg("walredod: sandbox probes done (%s)", in_sandbox ? "in the sandbox" : "without a sandbox")));
}
