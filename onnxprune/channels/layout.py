"""Ops that move channels around without computing: Concat, Split, Slice, Reshape / Flatten /
Squeeze / Unsqueeze, Transpose (channel shuffle), Gather on the channel axis."""

from __future__ import annotations

import numpy as np

from ..graph import attrs, default_opset, set_attr
from ..layers import all_zero
from .registry import Rule, register_rule
from .rules import contiguous, factor_slots, kept_box, new_dims, take_channels, unite_along


def _axis(node, rank, default=0) -> int:
    a = int(attrs(node).get("axis", default))
    return a + rank if a < 0 else a


class Concat(Rule):
    """Concat on a channel axis: out[offset_i + c] ≡ in_i[c] along that factor (the d of heads × d
    in a rotary rotate_half). Along another axis every input carries the same channels; a constant
    input there (a class token before the patch tokens) is a per-channel parameter, cut along with
    the channels."""

    @staticmethod
    def is_parameter(node, cg, name, sp_out) -> bool:
        c = cg.g.const(name)
        return (c is not None and _axis(node, c.ndim) not in sp_out.axes and c.ndim == cg.rank(node.output[0])
                and tuple(c.shape[a] for a in sp_out.axes) == sp_out.dims)

    def couple(self, node, cg):
        out = node.output[0]
        rank = cg.rank(out)
        spaced = [cg.space(i) for i in node.input if cg.space(i) is not None]
        if rank is None or not spaced:
            return self.pin_through(node, cg, f"Concat {node.name}: no input carries channels")
        axes = spaced[0].axes
        axis = _axis(node, rank)
        sp_out = cg.new_space(out, axes)
        if sp_out is None:
            return self.pin_through(node, cg, f"Concat {node.name}: dynamic channel dim")
        offset = 0
        for name in node.input:
            sp = cg.space(name)
            shape = cg.shape(name)
            if axis in axes:
                n = shape[axis] if shape is not None else None
                if n is None:
                    return self.pin_through(node, cg, f"Concat {node.name}: dynamic input size")
                part = sp_out.base + factor_slots(sp_out.dims, axes.index(axis), offset, offset + n)
                offset += n
            elif self.is_parameter(node, cg, name, sp_out):
                continue
            else:
                part = sp_out.slots
            if sp is not None and sp.axes == axes and sp.size == len(part):
                cg.unite(sp.slots, part)
            else:
                reason = f"Concat {node.name}: input {name} is not tracked (a graph input, an unknown op's output ...)"
                cg.pin(part, reason)
                cg.pin_space(sp, reason)

    def values(self, node, cg):
        out = node.output[0]
        sp_out = cg.space(out)
        if sp_out is None:
            return
        cg.values[out] = np.full(sp_out.size, np.nan)
        parts = [n if cg.space(n) is not None else None for n in node.input]
        axis = _axis(node, cg.rank(out))
        if axis in sp_out.axes:
            offset = 0
            for name in node.input:
                n = cg.shape(name)[axis]
                part = factor_slots(sp_out.dims, sp_out.axes.index(axis), offset, offset + n)
                if cg.space(name) is not None and cg.space(name).size == part.size:
                    cg.values[out][part] = cg.values[name]
                    for k, m in cg.maps.get(name, {}).items():
                        cg.maps.setdefault(out, {})[int(part[k])] = m
                offset += n
        elif all(p is not None for p in parts):  # joined along another axis: constant if all agree
            stacked = np.stack([cg.values[p] for p in parts])
            same = np.all(stacked == stacked[0], axis=0)
            cg.values[out] = np.where(same, stacked[0], np.nan)

    def rewrite(self, node, g, cg, keep):
        out = node.output[0]
        if out not in keep:
            return
        sp_out = cg.space(out)
        for i, name in enumerate(node.input):
            if self.is_parameter(node, cg, name, sp_out):
                g.set_input_const(node, i, take_channels(g.inits[name], sp_out.axes, sp_out, keep[out]))


class Split(Rule):
    def sizes(self, node, cg) -> list[int] | None:
        x = node.input[0]
        dim = cg.shape(x)[_axis(node, cg.rank(x))]
        if len(node.input) > 1 and node.input[1]:
            s = cg.g.const(node.input[1])
            return None if s is None else [int(v) for v in s]
        if "split" in attrs(node):
            return [int(v) for v in attrs(node)["split"]]
        n = len(node.output)
        if dim is None:
            return None
        chunk = -(-dim // n)  # opset 18 num_outputs: the last chunk may be smaller
        return [min(chunk, dim - i * chunk) for i in range(n)]

    def couple(self, node, cg):
        x = node.input[0]
        sp = cg.space(x)
        if sp is None:
            return self.pin_through(node, cg, f"Split {node.name}: input channels unknown")
        axis = _axis(node, cg.rank(x))
        if axis not in sp.axes:
            for o in node.output:
                cg.same_space(x, o)
            return
        sizes = self.sizes(node, cg)
        if sizes is None:
            return self.pin_through(node, cg, f"Split {node.name}: split sizes unknown")
        j, offset = sp.axes.index(axis), 0
        for o, n in zip(node.output, sizes):
            part = factor_slots(sp.dims, j, offset, offset + n)
            sp_o = cg.new_space(o, sp.axes)
            if sp_o is None or sp_o.size != part.size:
                return self.pin_through(node, cg, f"Split {node.name}: output sizes do not match")
            cg.unite(sp.base + part, sp_o.slots)
            offset += n

    def values(self, node, cg):
        sp = cg.space(node.input[0])
        if sp is None:
            return
        v = cg.values[node.input[0]]
        axis = _axis(node, cg.rank(node.input[0]))
        offset = 0
        for o in node.output:
            sp_o = cg.space(o)
            if sp_o is None:
                continue
            if axis in sp.axes:
                j = sp.axes.index(axis)
                cg.take(node.input[0], o, factor_slots(sp.dims, j, offset, offset + sp_o.dims[j]))
                offset += sp_o.dims[j]
            else:  # split along another axis: uniform constants stay, maps would be cut
                cg.values[o] = v.copy()

    def rewrite(self, node, g, cg, keep):
        x = node.input[0]
        sp = cg.space(x)
        if x not in keep or _axis(node, cg.rank(x)) not in sp.axes:
            return
        j = sp.axes.index(_axis(node, cg.rank(x)))
        sizes = [new_dims(cg.space(o), keep[o])[j] if o in keep else cg.space(o).dims[j] for o in node.output]
        if default_opset(g.model) >= 13:
            g.set_input_const(node, 1, np.array(sizes, np.int64), base=f"{node.name}_split")
            for i, a in enumerate(node.attribute):
                if a.name == "num_outputs":
                    del node.attribute[i]
                    break
        else:
            set_attr(node, "split", sizes)


class Slice(Rule):
    def params(self, node, cg):
        """(starts, ends, axes, steps) as int lists, or None if not constant."""
        if default_opset(cg.g.model) < 10:
            a = attrs(node)
            starts, ends = list(a["starts"]), list(a["ends"])
            return starts, ends, list(a.get("axes", range(len(starts)))), [1] * len(starts)
        consts = [cg.g.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
        starts, ends, axes, steps = consts
        if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None):
            return None
        if len(node.input) > 4 and node.input[4] and steps is None:
            return None
        n = len(starts)
        return ([int(v) for v in starts], [int(v) for v in ends],
                [int(v) for v in axes] if axes is not None else list(range(n)),
                [int(v) for v in steps] if steps is not None else [1] * n)

    def channel_slice(self, node, cg):
        """(position in the params lists, slice object) for the channel factor it cuts, or (None,
        None) when it cuts none; a reason string instead of the position when it is not understood."""
        x = node.input[0]
        sp = cg.space(x)
        p = self.params(node, cg)
        rank = cg.rank(x)
        if p is None:
            return "dynamic", None
        starts, ends, axes, steps = p
        axes = [a + rank if a < 0 else a for a in axes]
        hits = [i for i, a in enumerate(axes) if a in sp.axes]
        if not hits:
            return None, None
        if len(hits) > 1:
            return "unsupported", None
        i = hits[0]
        return i, slice(starts[i], ends[i], steps[i])

    def factor(self, node, cg, i) -> int:
        """Which factor of the input's channel range the slice at params position i cuts."""
        axis = self.params(node, cg)[2][i]
        return cg.space(node.input[0]).axes.index(axis + cg.rank(node.input[0]) if axis < 0 else axis)

    def part(self, node, cg, i, s) -> np.ndarray:
        """The input slots the slice keeps, in the output's order."""
        sp = cg.space(node.input[0])
        j = self.factor(node, cg, i)
        return factor_slots(sp.dims, j, *s.indices(sp.dims[j]))

    def couple(self, node, cg):
        x = node.input[0]
        sp = cg.space(x)
        if sp is None:
            return self.pin_through(node, cg, f"Slice {node.name}: input channels unknown")
        i, s = self.channel_slice(node, cg)
        if isinstance(i, str):
            return self.pin_through(node, cg, f"Slice {node.name}: {i} slice of the channel axis")
        if i is None:
            cg.same_space(x, node.output[0])
            return
        idx = self.part(node, cg, i, s)
        sp_o = cg.new_space(node.output[0], sp.axes)
        if sp_o is None or sp_o.size != len(idx):
            return self.pin_through(node, cg, f"Slice {node.name}: output size does not match")
        cg.unite(sp.slots[idx], sp_o.slots)
        if s.step != 1:  # (GPT-J's interleaved rotary, x[..., ::2]): that factor is never cut, so the slice stays
            j = self.factor(node, cg, i)
            unite_along(cg, sp, [k == j for k in range(len(sp.dims))])

    def values(self, node, cg):
        sp, sp_o = cg.space(node.input[0]), cg.space(node.output[0])
        if sp is None or sp_o is None:
            return
        i, s = self.channel_slice(node, cg)
        if s is not None:
            cg.take(node.input[0], node.output[0], self.part(node, cg, i, s))
        else:  # sliced along another axis: uniform constants stay, maps would be cut
            cg.values[node.output[0]] = cg.values[node.input[0]].copy()

    def rewrite(self, node, g, cg, keep):
        x = node.input[0]
        if x not in keep:
            return
        i, s = self.channel_slice(node, cg)
        if s is None or s.step != 1:
            return
        j = self.factor(node, cg, i)
        start, stop, _ = s.indices(cg.space(x).dims[j])
        kept = kept_box(cg.space(x), keep[x])[j]
        new_start, new_stop = int(np.sum(kept < start)), int(np.sum(kept < stop))
        if default_opset(g.model) < 10:
            a = attrs(node)
            starts, ends = list(a["starts"]), list(a["ends"])
            starts[i], ends[i] = new_start, new_stop
            set_attr(node, "starts", starts)
            set_attr(node, "ends", ends)
            return
        for k, value in ((1, new_start), (2, new_stop)):
            arr = g.inits[node.input[k]].copy()
            arr[i] = value
            g.set_input_const(node, k, arr)


def reshape_channel_map(in_shape, sp, out_shape):
    """Where a reshape puts the channels: (output axes, output slot -> input slot) or None.

    Elements keep their row-major order. The batch prefix must survive unchanged; the channel
    range may be split over several axes (channel shuffle) or merged with the leading part of
    the dims after it (flatten: slot k of the output belongs to channel k // I')."""
    if in_shape is None or out_shape is None or not contiguous(sp):
        return None
    a0, a1 = sp.axes[0], sp.axes[-1] + 1
    inner = in_shape[a1:]
    if any(d is None for d in inner):
        return None
    c, i_total = sp.size, int(np.prod(inner, dtype=np.int64))
    prefix = in_shape[:a0]
    if c == 1:  # a size-1 channel axis could be any size-1 axis: only a reshape that keeps it in place
        same = len(out_shape) > a0 and out_shape[a0] == 1 and tuple(out_shape[:a0]) == tuple(prefix)
        rest_ok = same and all(d is not None for d in out_shape[a0 + 1:]) and \
            int(np.prod(out_shape[a0 + 1:], dtype=np.int64)) == i_total
        return ((a0,), np.zeros(1, np.int64)) if rest_ok else None
    start = None
    for a in range(len(out_shape), -1, -1):
        tail = out_shape[a:]
        if any(d is None for d in tail) or int(np.prod(tail, dtype=np.int64)) != c * i_total:
            continue
        head = out_shape[:a]
        static = all(d is not None for d in head) and all(d is not None for d in prefix)
        if (static and np.prod(head, dtype=np.int64) == np.prod(prefix, dtype=np.int64)) or tuple(head) == tuple(prefix):
            start = a
            break
    if start is None:
        return None
    for b in range(start + 1, len(out_shape) + 1):
        p = int(np.prod(out_shape[start:b], dtype=np.int64))
        if p % c == 0 and i_total % (p // c) == 0:
            per = p // c
            return tuple(range(start, b)), np.arange(p) // per
    return None


def reshape_groups(a: tuple, b: tuple) -> list[tuple[tuple, tuple]] | None:
    """Pair runs of input axes with runs of output axes of equal element count, in order — what a
    row-major reshape keeps together: [(input axes, output axes)], or None. A size-1 axis pairs with
    nothing; a dynamic dim pairs only with a dynamic dim, and only when the static sizes between the
    dynamic dims agree on both sides, so that each keeps its place in the element order (the
    sequence axis of [B, N, h·d] -> [B, N, h, d]; not Swin's [B·nW, h, N, N] -> [B, nW, h, N, N]
    at a symbolic batch, which splits one)."""
    if None in a or None in b:
        if _static_runs(a) != _static_runs(b):
            return None
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1:
            groups.append(((i,), ()))
            i += 1
        elif j < len(b) and b[j] == 1:
            groups.append(((), (j,)))
            j += 1
        elif i == len(a) or j == len(b):
            return None
        elif a[i] is None or b[j] is None:
            if a[i] is not None or b[j] is not None:
                return None
            groups.append(((i,), (j,)))
            i, j = i + 1, j + 1
        else:
            ii, jj, pa, pb = i + 1, j + 1, a[i], b[j]
            while pa != pb:
                if pa < pb:
                    if ii == len(a) or a[ii] is None:
                        return None
                    pa, ii = pa * a[ii], ii + 1
                else:
                    if jj == len(b) or b[jj] is None:
                        return None
                    pb, jj = pb * b[jj], jj + 1
            groups.append((tuple(range(i, ii)), tuple(range(j, jj))))
            i, j = ii, jj
    return groups


def _static_runs(shape) -> list[int]:
    """The products of the static dims before, between and after the dynamic ones."""
    runs = [1]
    for d in shape:
        if d is None:
            runs.append(1)
        else:
            runs[-1] *= d
    return runs


def grouped_channel_map(in_shape, sp, out_shape):
    """reshape_channel_map for channel factors on axes that need not be adjacent (heads and features
    of [B, kv, rep, N, d] -> [B, kv·rep, N, d], the GQA repeat): each run of axes that reshape_groups
    pairs is mapped on its own; a run with channel axes puts them on all its output axes (slot k of
    kv·rep belongs to kv head k // rep). (output axes, output slot -> input slot) or None."""
    if not in_shape or not out_shape or 1 in sp.dims:  # (a size-1 factor could land on any size-1 axis)
        return None
    groups = reshape_groups(tuple(in_shape), tuple(out_shape))
    if groups is None:
        return None
    strides = np.cumprod((1,) + sp.dims[:0:-1])[::-1]  # each factor's stride in the slot numbering
    out_axes, mapping = [], np.zeros(1, np.int64)
    for ins, outs in groups:
        factors = [a for a in ins if a in sp.axes]
        if not factors:
            continue
        if not outs:
            return None
        part = np.zeros([in_shape[a] for a in ins], np.int64)
        for a in factors:
            shape = [1] * len(ins)
            shape[ins.index(a)] = in_shape[a]
            part = part + np.arange(in_shape[a]).reshape(shape) * int(strides[sp.axes.index(a)])
        out_axes.extend(outs)
        mapping = np.add.outer(mapping, part.ravel()).ravel()  # row-major over the output axes
    if sum(1 for ins, _ in groups for a in ins if a in sp.axes) != len(sp.axes):
        return None
    return tuple(out_axes), mapping


def unsqueeze_channel_map(node, cg):
    """Squeeze / Unsqueeze by their axes: the channel axes move past the axes added or removed (a
    squeezed size-1 channel axis leaves the space)."""
    x = node.input[0]
    sp, rank, out_rank = cg.space(x), cg.rank(x), cg.rank(node.output[0])
    given = cg.g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attrs(node).get("axes")
    if rank is None or out_rank is None or (given is None and len(node.input) > 1):
        return None
    if given is None:  # Squeeze without axes: every size-1 axis
        given = [a for a, d in enumerate(cg.shape(x)) if d == 1]
    given = sorted(int(a) % (out_rank if node.op_type == "Unsqueeze" else rank) for a in np.ravel(given))
    if node.op_type == "Unsqueeze":
        kept_in = [a for a in range(out_rank) if a not in given]  # output axis of each input axis
        axes = tuple(kept_in[a] for a in sp.axes)
    else:
        axes = tuple(a - sum(1 for r in given if r < a) for a in sp.axes if a not in given)
    return (axes, np.arange(sp.size)) if axes else None


def channel_map(node, cg):
    x, out = node.input[0], node.output[0]
    sp = cg.space(x)
    if node.op_type in ("Squeeze", "Unsqueeze"):
        return unsqueeze_channel_map(node, cg)
    return reshape_channel_map(cg.shape(x), sp, cg.shape(out)) or grouped_channel_map(cg.shape(x), sp, cg.shape(out))


class Reshape(Rule):
    """Reshape, Flatten, Squeeze, Unsqueeze: a reshape of the channel range (see reshape_channel_map,
    grouped_channel_map)."""

    def couple(self, node, cg):
        x, out = node.input[0], node.output[0]
        sp = cg.space(x)
        if sp is None:
            return
        if node.op_type == "Reshape" and not cg.g.is_const(node.input[1]):
            return self.pin_through(node, cg, f"Reshape {node.name}: shape is computed at run time")
        m = channel_map(node, cg)
        sp_o = cg.new_space(out, m[0]) if m is not None else None
        if sp_o is None or sp_o.size != len(m[1]):
            return self.pin_through(node, cg, f"{node.op_type} {node.name}: moves the channels in a way not understood")
        cg.unite(sp.slots[m[1]], sp_o.slots)

    def values(self, node, cg):
        sp, sp_o = cg.space(node.input[0]), cg.space(node.output[0])
        if sp is None or sp_o is None:
            return
        x, out = node.input[0], node.output[0]
        axes, mapping = channel_map(node, cg)
        cg.values[out] = cg.values[x][mapping]
        maps = cg.maps.get(x, {})
        if not maps:
            return
        per = len(mapping) // sp.size  # output slots per input channel
        rest = cg.rest_shape(out)
        cg.maps[out] = {}
        for k in range(len(mapping)):
            m = maps.get(int(mapping[k]))
            if m is None:
                continue
            if per == 1 and rest is not None and int(np.prod(rest)) == m.size:
                cg.maps[out][k] = m.reshape(rest)
            elif per == m.size:  # flatten: each output slot is one element of the map
                cg.values[out][k] = m.reshape(-1)[k % per]

    def rewrite(self, node, g, cg, keep):
        out = node.output[0]
        if node.op_type != "Reshape" or out not in keep:
            return
        sp_o = cg.space(out)
        shape = g.inits[node.input[1]].copy()
        for a, d in zip(sp_o.axes, new_dims(sp_o, keep[out])):
            shape[a] = d
        g.set_input_const(node, 1, shape)


class Transpose(Rule):
    """A permutation of the channel factors: [B, N, h, d] -> [B, h, N, d] puts heads and features on
    axes 1 and 3 (a space need not sit on adjacent axes)."""

    @staticmethod
    def channel_map(node, cg):
        sp = cg.space(node.input[0])
        rank = cg.rank(node.input[0])
        perm = list(attrs(node).get("perm", range(rank - 1, -1, -1)))
        order = sorted(sp.axes, key=perm.index)  # the channel factors in output order
        mapping = np.arange(sp.size).reshape(sp.dims).transpose([sp.axes.index(a) for a in order]).ravel()
        return tuple(perm.index(a) for a in order), mapping

    def couple(self, node, cg):
        sp = cg.space(node.input[0])
        if sp is None:
            return
        axes, mapping = self.channel_map(node, cg)
        sp_o = cg.new_space(node.output[0], axes)
        if sp_o is None:
            return self.pin_through(node, cg, f"Transpose {node.name}: unknown output shape")
        cg.unite(sp.slots[mapping], sp_o.slots)

    def values(self, node, cg):
        if cg.space(node.input[0]) is None or cg.space(node.output[0]) is None:
            return
        x, out = node.input[0], node.output[0]
        mapping = self.channel_map(node, cg)[1]
        rank = cg.rank(x)
        perm = list(attrs(node).get("perm", range(rank - 1, -1, -1)))
        others = [a for a in perm if a not in cg.space(x).axes]
        if others == sorted(others):  # the other axes keep their order: maps move with their slots
            cg.take(x, out, mapping)
        else:
            cg.values[out] = cg.values[x][mapping]


class Gather(Rule):
    """Gather, three ways:
    - an embedding lookup: a constant table [V, D] indexed by token ids opens a space on the output's
      last axis; channel c is column c of the table (a linear layer of one-hot ids);
    - constant indices on a channel axis: 1-D ones select / permute the channels; a scalar one picks
      one entry of a channel factor (q = qkv[0] of [3, B, h, N, d]) and leaves the other factors;
    - constant indices on another axis (the class token x[:, 0]): every channel passes through."""

    @staticmethod
    def is_lookup(node, cg) -> bool:
        table = cg.g.const(node.input[0])
        return (table is not None and table.ndim == 2 and table.dtype.kind == "f"
                and not cg.g.is_const(node.input[1]) and _axis(node, 2) == 0)

    @staticmethod
    def selection(node, cg):
        """(output axes, output slot -> input slot) for constant indices, or None."""
        x = node.input[0]
        sp, idx, rank = cg.space(x), cg.g.const(node.input[1]), cg.rank(x)
        if sp is None or idx is None or rank is None:
            return None
        axis = _axis(node, rank)
        if axis not in sp.axes:  # the axes after `axis` shift by the rank the indices add or remove
            return tuple(a if a < axis else a + idx.ndim - 1 for a in sp.axes), np.arange(sp.size)
        j = sp.axes.index(axis)
        idx = np.where(idx < 0, idx + sp.dims[j], idx).astype(np.int64)
        if idx.ndim == 1 and len(sp.axes) == 1:
            return sp.axes, idx
        if idx.ndim == 0 and len(sp.axes) > 1:
            axes = tuple(a if a < axis else a - 1 for a in sp.axes if a != axis)
            return axes, np.arange(sp.size).reshape(sp.dims).take(int(idx), axis=j).ravel()
        return None

    def couple(self, node, cg):
        out = node.output[0]
        if self.is_lookup(node, cg):
            rank = cg.rank(out)
            if rank is None or cg.new_space(out, (rank - 1,)) is None:
                self.pin_through(node, cg, f"Gather {node.name}: embedding lookup with unknown output shape")
            return
        if cg.space(node.input[0]) is None:
            return self.pin_through(node, cg, f"Gather {node.name}: input channels unknown")
        m = self.selection(node, cg)
        sp_o = cg.new_space(out, m[0]) if m is not None else None
        if sp_o is None or sp_o.size != len(m[1]):
            return self.pin_through(node, cg, f"Gather {node.name}: not a constant selection of channels")
        cg.unite(cg.space(node.input[0]).slots[m[1]], sp_o.slots)

    def values(self, node, cg):
        x, out = node.input[0], node.output[0]
        if cg.space(out) is None:
            return
        if self.is_lookup(node, cg):  # an all-zero column embeds every token as 0
            cg.values[out] = np.where(all_zero(cg.g.inits[x], tuple(range(1, cg.g.inits[x].ndim))), 0.0, np.nan)
        elif _axis(node, cg.rank(x)) in cg.space(x).axes:
            cg.take(x, out, self.selection(node, cg)[1])
        else:  # rows picked along another axis: uniform constants stay, maps would be cut
            cg.values[out] = cg.values[x].copy()

    def rewrite(self, node, g, cg, keep):
        x, out = node.input[0], node.output[0]
        if x not in keep and out not in keep:
            return
        if self.is_lookup(node, cg):
            g.set_input_const(node, 0, np.ascontiguousarray(g.inits[x][:, keep[out]]))
            return
        sp, axis = cg.space(x), _axis(node, cg.rank(x))
        if axis not in sp.axes:
            return
        idx = g.inits[node.input[1]]
        kept_in = keep.get(x, np.arange(sp.size))
        if idx.ndim == 0:  # a scalar index into one channel factor: count the entries kept before it
            j = sp.axes.index(axis)
            mask = np.zeros(sp.size, bool)
            mask[kept_in] = True
            kept_j = mask.reshape(sp.dims).any(axis=tuple(k for k in range(len(sp.dims)) if k != j))
            i = int(idx) + sp.dims[j] if int(idx) < 0 else int(idx)
            g.set_input_const(node, 1, np.array(int(kept_j[:i].sum()), idx.dtype))
            return
        selected = self.selection(node, cg)[1]
        kept_out = keep.get(out, np.arange(len(selected)))
        g.set_input_const(node, 1, np.searchsorted(kept_in, selected[kept_out]).astype(idx.dtype))


class Expand(Rule):
    """Expand(x, shape): broadcasts x's other axes (the GQA repeat of k / v heads over their query
    heads); the channel axes keep their extent, and the shape's entries there become 1 when channels
    go (1 keeps x's own size)."""

    def couple(self, node, cg):
        x, out = node.input[0], node.output[0]
        sp = cg.space(x)
        if sp is None:
            return
        in_shape, out_shape = cg.shape(x), cg.shape(out)
        if not cg.g.is_const(node.input[1]) or out_shape is None:
            return self.pin_through(node, cg, f"Expand {node.name}: shape computed at run time")
        axes = tuple(a + len(out_shape) - len(in_shape) for a in sp.axes)
        if any(out_shape[a] != d for a, d in zip(axes, sp.dims)):
            return self.pin_through(node, cg, f"Expand {node.name}: channel axes not understood")
        sp_o = cg.new_space(out, axes)
        if sp_o is None:
            return self.pin_through(node, cg, f"Expand {node.name}: unknown output shape")
        cg.unite(sp.slots, sp_o.slots)

    def values(self, node, cg):
        if cg.space(node.output[0]) is not None:  # uniform constants stay; maps would be broadcast
            cg.values[node.output[0]] = cg.values[node.input[0]].copy()

    def rewrite(self, node, g, cg, keep):
        out = node.output[0]
        if out not in keep:
            return
        shape = g.inits[node.input[1]].copy()
        rank = cg.rank(out)
        for a in cg.space(out).axes:
            if a - (rank - shape.size) >= 0:
                shape[a - (rank - shape.size)] = 1
        g.set_input_const(node, 1, shape)


class ShapeOf(Rule):
    """Shape(x, start=s): reads no channel when s lies past x's channel axes (the border maps of
    dynamic-size inputs read the spatial size this way); any other Shape sees the channel count."""

    def couple(self, node, cg):
        sp, rank = cg.space(node.input[0]), cg.rank(node.input[0])
        if sp is None:
            return
        start = int(attrs(node).get("start", 0))
        start = start + rank if start < 0 and rank is not None else start
        if start <= max(sp.axes) or "end" in attrs(node):
            cg.pin_space(sp, f"Shape {node.name}: reads the channel count")


register_rule("Concat", Concat(), permute=True)
register_rule("Split", Split())
register_rule("Slice", Slice())
register_rule(["Reshape", "Flatten", "Squeeze", "Unsqueeze"], Reshape(), permute=True)
register_rule("Transpose", Transpose())
register_rule("Gather", Gather())
register_rule("Expand", Expand(), permute=True)
register_rule("Shape", ShapeOf(), permute=True)
