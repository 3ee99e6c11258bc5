/* startup: the start-up probe of migrate-bench's overhead section.
 *
 * A dynamically linked C program that exits at once with status 0: the time from spawning it to
 * its exit is the cost of exec, the dynamic loader and libc's start-up, and under migrate-run also
 * migrate-run's checks and exec, loading libmigrate.so and libmigrate's constructor.
 */
int main(void) {
    return 0;
}
