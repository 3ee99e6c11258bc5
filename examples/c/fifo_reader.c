/* fifo_reader: blocks reading a FIFO.
 *
 * usage: fifo_reader <fifo path>
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 *   opened                      (the FIFO is open for reading)
 *   got <bytes read, trailing whitespace trimmed>     (one per read() that returned data)
 *   eof                         (read() returned 0; then exit 0)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2) {
        fprintf(stderr, "usage: %s <fifo path>\n", argv[0]);
        return 2;
    }
    printf("ready pid=%d\n", (int)getpid());
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        fprintf(stderr, "fifo_reader: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    printf("opened\n");
    for (;;) {
        char buf[257];
        ssize_t n = read(fd, buf, 256);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "fifo_reader: read: %s\n", strerror(errno));
            return 1;
        }
        if (n == 0) {
            printf("eof\n");
            return 0;
        }
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
            n--;
        buf[n] = '\0';
        printf("got %s\n", buf);
    }
}
