// SPDX-License-Identifier: GPL-2.0
/*
 * The TLB-shootdown test of the built-in rigs (scripts/rig builds it static into the guest as
 * /tlbtest; scripts/guest-init.sh runs it).
 *
 * One reader thread per CPU, pinned, reads one page of memory over and over, while the main
 * thread replaces that page, round after round, by a page holding the next generation number:
 * it writes the number into a page of its own elsewhere, moves that page over the read one
 * with mremap(MREMAP_FIXED) (the old page is unmapped, every CPU's translation of it shot
 * down, and the page freed), and then publishes the number. A reader that has seen generation
 * g published and then reads a smaller number from the page read it through a translation
 * that should have been shot down: a stale access. The readers never see an unmapped address
 * (the move replaces the mapping in one step), so nothing else can make them read a smaller
 * number.
 *
 *   /tlbtest [ROUNDS]    prints "tlbtest cpus=N rounds=R reads=M stale=S", exit 0 iff S = 0
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

static volatile unsigned long *page;
static atomic_ulong published;
static atomic_int stop;
static atomic_ulong reads, stale;

static void pin(long cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

static void *reader(void *arg)
{
	unsigned long n = 0, s = 0;

	pin((long)arg);
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		unsigned long g = atomic_load_explicit(&published, memory_order_acquire);

		if (*page < g)
			s++;
		n++;
	}
	atomic_fetch_add(&reads, n);
	atomic_fetch_add(&stale, s);
	return NULL;
}

int main(int argc, char **argv)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN), rounds = argc > 1 ? atol(argv[1]) : 2000;
	pthread_t t[256];
	long c;

	if (cpus < 1 || cpus > 256)
		return 2;
	page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page == MAP_FAILED)
		return 2;
	*page = 1;
	atomic_store(&published, 1);
	for (c = 0; c < cpus; c++)
		if (pthread_create(&t[c], NULL, reader, (void *)c))
			return 2;
	pin(0);
	for (unsigned long g = 2; g < (unsigned long)rounds + 2; g++) {
		volatile unsigned long *next = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
						    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (next == MAP_FAILED)
			return 2;
		*next = g;
		if (mremap((void *)next, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)page) !=
		    (void *)page)
			return 2;
		atomic_store_explicit(&published, g, memory_order_release);
	}
	atomic_store(&stop, 1);
	for (c = 0; c < cpus; c++)
		pthread_join(t[c], NULL);
	printf("tlbtest cpus=%ld rounds=%ld reads=%lu stale=%lu\n", cpus, rounds,
	       atomic_load(&reads), atomic_load(&stale));
	return atomic_load(&stale) ? 1 : 0;
}
