/* Maglev table population for bpflb's agent (bpflb.model.maglev loads it with ctypes): the loop that
 * Python cannot run fast enough.  Built by `make` into bpf_objects/build/libbpflb_maglev.so. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Fill table[0..m) the Maglev way: backends 0..n-1 take turns, in that order, each claiming the next
 * free entry of its preference list (offset[i] + j * skip[i]) % m, until every entry is taken.
 * table[e] receives label[i] of the backend that claimed e; labels must be non-zero.
 * Returns 0, or -1 for bad arguments (m == 0, n == 0, a zero label, skip outside 1..m-1, offset >= m)
 * or when memory runs out. */
int bpflb_maglev_fill(uint32_t m, uint32_t n, const uint32_t *offset, const uint32_t *skip,
		      const uint16_t *label, uint16_t *table)
{
	uint32_t *pos;
	uint32_t filled = 0, i;

	if (m == 0 || n == 0)
		return -1;
	for (i = 0; i < n; i++)
		if (label[i] == 0 || offset[i] >= m || skip[i] == 0 || skip[i] >= m)
			return -1;
	pos = malloc(sizeof(*pos) * n);
	if (!pos)
		return -1;
	memcpy(pos, offset, sizeof(*pos) * n);
	memset(table, 0, sizeof(*table) * m);
	while (filled < m) {
		for (i = 0; i < n && filled < m; i++) {
			uint32_t c = pos[i];

			/* m is prime, so the preference list visits every entry: a free one is found. */
			while (table[c]) {
				c += skip[i];
				if (c >= m)
					c -= m;
			}
			table[c] = label[i];
			c += skip[i];
			pos[i] = c >= m ? c - m : c;
			filled++;
		}
	}
	free(pos);
	return 0;
}
