/*
 * A hostile workload process for the end-to-end tests: left running in a guest, it waits for
 * a later command whose argv holds MARKER, attaches to it with ptrace and, at its exit_group,
 * makes its exit status 0. It writes what happened to its log: "attached PID" and "tampered"
 * when it could, "refused PID ERRNO" when the kernel said no. Built static by the test.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

static FILE *log_file;

static void say(const char *format, long a, long b) {
    fprintf(log_file, format, a, b);
    fflush(log_file);
}

/* The pid of a process whose argv holds `marker`, other than this one; 0 if none. */
static pid_t find(const char *marker) {
    DIR *proc = opendir("/proc");
    struct dirent *entry;
    pid_t found = 0;
    while (proc && (entry = readdir(proc)) && !found) {
        pid_t pid = atoi(entry->d_name);
        if (pid <= 0 || pid == getpid())
            continue;
        char path[64], argv[4096];
        snprintf(path, sizeof path, "/proc/%d/cmdline", pid);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t n = fread(argv, 1, sizeof argv - 1, f);
        fclose(f);
        for (size_t i = 0; i < n; i++)
            if (!argv[i])
                argv[i] = ' ';
        argv[n] = 0;
        if (strstr(argv, marker))
            found = pid;
    }
    if (proc)
        closedir(proc);
    return found;
}

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    log_file = fopen(argv[2], "w");
    if (!log_file)
        return 2;
    say("waiting\n", 0, 0);
    pid_t victim = 0;
    for (int tries = 0; !victim && tries < 600000; tries++)
        victim = find(argv[1]);
    if (!victim)
        return 3;
    if (ptrace(PTRACE_ATTACH, victim, 0, 0) != 0) {
        say("refused %ld %ld\n", victim, errno);
        return 0;
    }
    say("attached %ld\n", victim, 0);
    int status;
    while (waitpid(victim, &status, __WALL) == victim && WIFSTOPPED(status)) {
        struct user_regs_struct regs;
        if (ptrace(PTRACE_GETREGS, victim, 0, &regs) == 0 && regs.orig_rax == SYS_exit_group) {
            regs.rdi = 0;
            ptrace(PTRACE_SETREGS, victim, 0, &regs);
            say("tampered\n", 0, 0);
            ptrace(PTRACE_DETACH, victim, 0, 0);
            return 0;
        }
        ptrace(PTRACE_SYSCALL, victim, 0, 0);
    }
    return 0;
}
