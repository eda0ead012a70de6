/*
 * The variadic entry point SQLite's unix VFS calls as `fcntl` once aex has replaced that system
 * call (see ofd.rs). SQLite calls it through `int (*)(int, int, ...)`, and stable Rust cannot
 * define a variadic function, so this shim reads the third argument the way glibc's own `fcntl`
 * does (as a pointer-sized value) and hands everything to the Rust function set beforehand.
 */
#include <stdarg.h>
#include <stddef.h>

typedef int (*aex_ofd_impl_fn)(int fd, int cmd, void *arg);

static aex_ofd_impl_fn aex_ofd_impl = NULL;

void aex_ofd_set_impl(aex_ofd_impl_fn f) { aex_ofd_impl = f; }

int aex_ofd_fcntl(int fd, int cmd, ...) {
    va_list ap;
    void *arg;
    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    return aex_ofd_impl(fd, cmd, arg);
}
