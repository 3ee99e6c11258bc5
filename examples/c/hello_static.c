/* hello_static: trivial; built with -static so that migrate-run must refuse it
 * (a statically linked program ignores LD_PRELOAD).
 *
 * Output: hello from a static binary
 */
#include <stdio.h>

int main(void)
{
    printf("hello from a static binary\n");
    return 0;
}
