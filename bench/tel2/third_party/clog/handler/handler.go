// Package handler provides the text slog.Handler that Telepresence 2
// configures through github.com/telepresenceio/clog/handler. Written for the
// benchmark build as a stand-in; the exported names match what Telepresence
// v2.27.4 uses, the output layout is this package's own:
//
//	[time ]LEVEL [group/group : ]message[ key=value ...][ (file:line)]
package handler

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"unicode"
)

// LevelWriter receives a whole formatted record together with its level.
type LevelWriter interface {
	Write(level slog.Level, data []byte) (int, error)
}

type anyLevel struct{ w io.Writer }

func (a anyLevel) Write(_ slog.Level, p []byte) (int, error) { return a.w.Write(p) }

// AllLevelsWriter sends records of every level to w.
func AllLevelsWriter(w io.Writer) LevelWriter { return anyLevel{w} }

// EnabledFunc decides, per context, whether a level is logged.
type EnabledFunc func(context.Context, slog.Level) bool

// Option configures NewText.
type Option func(*config)

type config struct {
	out        LevelWriter
	timeFormat string
	enabled    EnabledFunc
	hideFrom   slog.Level
	hide       bool
	source     bool
	attrs      []slog.Attr
	groups     []string
}

// Output sends every record to w.
func Output(w io.Writer) Option { return func(c *config) { c.out = anyLevel{w} } }

// LevelOutput sends each record to lw, which may route by level.
func LevelOutput(lw LevelWriter) Option { return func(c *config) { c.out = lw } }

// TimeFormat sets the time layout; "" leaves the time out.
func TimeFormat(layout string) Option { return func(c *config) { c.timeFormat = layout } }

// EnabledLevel logs records at level and above.
func EnabledLevel(level slog.Level) Option {
	return func(c *config) {
		c.enabled = func(_ context.Context, l slog.Level) bool { return l >= level }
	}
}

// LevelEnabler lets f decide which levels are logged.
func LevelEnabler(f EnabledFunc) Option { return func(c *config) { c.enabled = f } }

// HideLevel omits the level word for records at level and above.
func HideLevel(level slog.Level) Option {
	return func(c *config) { c.hideFrom, c.hide = level, true }
}

// IncludeSource appends the caller's file:line to every record.
func IncludeSource(on bool) Option { return func(c *config) { c.source = on } }

// Attrs adds attributes to every record.
func Attrs(attrs ...slog.Attr) Option { return func(c *config) { c.attrs = attrs } }

// Groups opens the given groups for every record.
func Groups(groups ...string) Option { return func(c *config) { c.groups = groups } }

type textHandler struct {
	cfg    *config
	mu     *sync.Mutex
	groups []string // open groups, outermost first
	pre    string   // rendered attributes added through WithAttrs
}

// NewText returns a text handler. Without Output or LevelOutput it writes
// nowhere; without an enabler it logs Info and above.
func NewText(opts ...Option) slog.Handler {
	c := &config{out: anyLevel{io.Discard}}
	for _, o := range opts {
		o(c)
	}
	if c.enabled == nil {
		c.enabled = func(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }
	}
	h := &textHandler{cfg: c, mu: new(sync.Mutex), groups: c.groups}
	if len(c.attrs) > 0 {
		return h.WithAttrs(c.attrs)
	}
	return h
}

func (h *textHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.cfg.enabled(ctx, level)
}

func (h *textHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.groups = append(append([]string(nil), h.groups...), name)
	return &c
}

func (h *textHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return h
	}
	var b strings.Builder
	b.WriteString(h.pre)
	prefix := h.keyPrefix()
	for _, a := range attrs {
		writeAttr(&b, prefix, a)
	}
	c := *h
	c.pre = b.String()
	return &c
}

func (h *textHandler) keyPrefix() string {
	if len(h.groups) == 0 {
		return ""
	}
	return strings.Join(h.groups, ".") + "."
}

func levelWord(l slog.Level) string {
	const trace = slog.LevelDebug - 4
	switch {
	case l == trace:
		return "trace"
	case l < slog.LevelDebug:
		return fmt.Sprintf("trace%+d", int(l-trace))
	default:
		return strings.ToLower(l.String())
	}
}

func (h *textHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	if h.cfg.timeFormat != "" && !r.Time.IsZero() {
		b.WriteString(r.Time.Format(h.cfg.timeFormat))
		b.WriteByte(' ')
	}
	if !h.cfg.hide || r.Level < h.cfg.hideFrom {
		lw := levelWord(r.Level)
		b.WriteString(lw)
		for i := len(lw); i < 6; i++ {
			b.WriteByte(' ')
		}
		b.WriteByte(' ')
	}
	if len(h.groups) > 0 {
		b.WriteString(strings.Join(h.groups, "/"))
		b.WriteString(" : ")
	}
	b.WriteString(r.Message)
	b.WriteString(h.pre)
	prefix := h.keyPrefix()
	r.Attrs(func(a slog.Attr) bool {
		writeAttr(&b, prefix, a)
		return true
	})
	if r.PC != 0 && (h.cfg.source || r.Level < slog.LevelDebug) {
		fr, _ := runtime.CallersFrames([]uintptr{r.PC}).Next()
		if fr.File != "" {
			b.WriteString(" (")
			b.WriteString(filepath.Base(fr.File))
			b.WriteByte(':')
			b.WriteString(strconv.Itoa(fr.Line))
			b.WriteByte(')')
		}
	}
	b.WriteByte('\n')
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := h.cfg.out.Write(r.Level, []byte(b.String()))
	return err
}

func writeAttr(b *strings.Builder, prefix string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return
	}
	if a.Value.Kind() == slog.KindGroup {
		sub := a.Value.Group()
		if len(sub) == 0 {
			return
		}
		p := prefix
		if a.Key != "" {
			p = prefix + a.Key + "."
		}
		for _, s := range sub {
			writeAttr(b, p, s)
		}
		return
	}
	b.WriteByte(' ')
	b.WriteString(prefix)
	b.WriteString(a.Key)
	b.WriteByte('=')
	b.WriteString(quoted(a.Value.String()))
}

func quoted(s string) string {
	if s == "" {
		return `""`
	}
	for _, r := range s {
		if unicode.IsSpace(r) || r == '"' || r == '=' || !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}
