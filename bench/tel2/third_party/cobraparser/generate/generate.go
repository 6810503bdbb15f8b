// Package generate turns a types.CommandInfo into a pflag.FlagSet.
// Written for the benchmark build (see ../types).
package generate

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/docker/docker/opts"
	"github.com/spf13/pflag"

	"github.com/telepresenceio/telepresence/cmd/cobraparser/v2/types"
)

// FlagSet returns a flag set named name that declares every flag of ci. An
// unparsable default falls back to the type's zero value; an unknown type
// panics, since the command tree is compiled into the program.
func FlagSet(name string, ci *types.CommandInfo) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	for i := range ci.Flags {
		addFlag(fs, name, &ci.Flags[i])
	}
	return fs
}

func addFlag(fs *pflag.FlagSet, setName string, f *types.FlagInfo) {
	n, d, u := f.Name, f.Default, f.Description
	i64 := func() int64 { v, _ := strconv.ParseInt(d, 10, 64); return v }
	u64 := func() uint64 { v, _ := strconv.ParseUint(d, 10, 64); return v }
	f64 := func() float64 { v, _ := strconv.ParseFloat(d, 64); return v }
	switch f.Type {
	case "bool":
		v, _ := strconv.ParseBool(d)
		fs.Bool(n, v, u)
	case "string", "filter":
		fs.String(n, d, u)
	case "stringArray":
		var v []string
		if d != "" {
			v = strings.Split(d, ",")
		}
		fs.StringArray(n, v, u)
	case "stringSlice":
		fs.StringSlice(n, nil, u)
	case "duration":
		v, _ := time.ParseDuration(d)
		fs.Duration(n, v, u)
	case "durationSlice":
		fs.DurationSlice(n, nil, u)
	case "boolSlice":
		fs.BoolSlice(n, nil, u)
	case "int":
		fs.Int(n, int(i64()), u)
	case "int8":
		fs.Int8(n, int8(i64()), u)
	case "int16":
		fs.Int16(n, int16(i64()), u)
	case "int32":
		fs.Int32(n, int32(i64()), u)
	case "int64":
		fs.Int64(n, i64(), u)
	case "intSlice", "int8Slice", "int16Slice":
		fs.IntSlice(n, nil, u)
	case "int32Slice":
		fs.Int32Slice(n, nil, u)
	case "int64Slice":
		fs.Int64Slice(n, nil, u)
	case "uint":
		fs.Uint(n, uint(u64()), u)
	case "uint8":
		fs.Uint8(n, uint8(u64()), u)
	case "uint16":
		fs.Uint16(n, uint16(u64()), u)
	case "uint32":
		fs.Uint32(n, uint32(u64()), u)
	case "uint64":
		fs.Uint64(n, u64(), u)
	case "uintSlice":
		fs.UintSlice(n, nil, u)
	case "float32":
		fs.Float32(n, float32(f64()), u)
	case "float64":
		fs.Float64(n, f64(), u)
	case "float32Slice":
		fs.Float32Slice(n, nil, u)
	case "float64Slice":
		fs.Float64Slice(n, nil, u)
	case "scale":
		fs.Uint32(n, 0, u)
	case "bytes":
		fs.Var(new(opts.MemBytes), n, u)
	case "list":
		fs.Var(opts.NewListOptsRef(new([]string), nil), n, u)
	default:
		panic(fmt.Sprintf("flag set %s: flag --%s has unknown type %q", setName, n, f.Type))
	}
	if f.Shorthand != "" {
		fs.Lookup(n).Shorthand = f.Shorthand
	}
}
