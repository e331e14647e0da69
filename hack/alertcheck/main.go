// alertcheck checks Prometheus alerting rules as `promtool check rules` does (Prometheus' own
// rule parser), loads scrapes of the running system into an in-memory store, and says for each
// alerting rule whether its expression yields series at -at: the rule would fire (its `for:`
// aside). The operator's tests use it to prove each alert fires in the state it is about, and
// stays quiet on a healthy system. Built by `hack/go-tool.sh alertcheck`.
//
// The store is a small in-memory one: Prometheus' tsdb would bring its configuration and
// service-discovery packages (client-go, cloud SDKs) into the build.
//
// Usage: alertcheck -rules rules.yaml -scrapes DIR [-scrapes DIR...] -at <unix seconds> [-honor-for]
// Each DIR is one target (its name becomes the instance label, job is "uwsgi-it") and holds
// <unix-seconds>.prom files: Prometheus text format, or OpenMetrics when it has "# EOF".
// Exit: 0 ok, 1 rule file invalid, 2 scrape or evaluation error.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/common/model"

	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/model/textparse"
	"github.com/prometheus/prometheus/model/value"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"
)

// ---- minimal in-memory storage.Queryable (avoids importing tsdb -> config -> discovery/k8s/cloud SDKs)

type fSample struct {
	t int64
	f float64
}

func (s fSample) T() int64                      { return s.t }
func (s fSample) ST() int64                     { return 0 }
func (s fSample) F() float64                    { return s.f }
func (s fSample) H() *histogram.Histogram       { return nil }
func (s fSample) FH() *histogram.FloatHistogram { return nil }
func (s fSample) Type() chunkenc.ValueType      { return chunkenc.ValFloat }
func (s fSample) Copy() chunks.Sample           { return s }

type memSeries struct {
	lset    labels.Labels
	samples []chunks.Sample // strictly increasing timestamps
}

type memStore struct {
	byKey  map[string]*memSeries
	sorted []*memSeries
}

func (m *memStore) add(lset labels.Labels, t int64, v float64) {
	k := lset.String()
	s, ok := m.byKey[k]
	if !ok {
		s = &memSeries{lset: lset}
		m.byKey[k] = s
	}
	if n := len(s.samples); n > 0 && s.samples[n-1].T() >= t {
		return // duplicate / out-of-order sample: Prometheus would reject it too
	}
	s.samples = append(s.samples, fSample{t, v})
}

func (m *memStore) finish() {
	for _, s := range m.byKey {
		m.sorted = append(m.sorted, s)
	}
	sort.Slice(m.sorted, func(i, j int) bool { return labels.Compare(m.sorted[i].lset, m.sorted[j].lset) < 0 })
}

func (m *memStore) Querier(_, _ int64) (storage.Querier, error) { return memQuerier{m}, nil }

type memQuerier struct{ m *memStore }

func (q memQuerier) Select(_ context.Context, _ bool, _ *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
	var out []storage.Series
next:
	for _, s := range q.m.sorted {
		for _, mt := range ms {
			if !mt.Matches(s.lset.Get(mt.Name)) {
				continue next
			}
		}
		out = append(out, storage.NewListSeries(s.lset, s.samples))
	}
	return &sliceSet{s: out, i: -1}
}
func (memQuerier) LabelValues(context.Context, string, *storage.LabelHints, ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	return nil, nil, nil
}
func (memQuerier) LabelNames(context.Context, *storage.LabelHints, ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	return nil, nil, nil
}
func (memQuerier) Close() error { return nil }

type sliceSet struct {
	s []storage.Series
	i int
}

func (x *sliceSet) Next() bool                      { x.i++; return x.i < len(x.s) }
func (x *sliceSet) At() storage.Series              { return x.s[x.i] }
func (*sliceSet) Err() error                        { return nil }
func (*sliceSet) Warnings() annotations.Annotations { return nil }

// ---- scrape loading

func loadScrapes(dir, job, instance string, st *memStore) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.prom"))
	if err != nil {
		return err
	}
	type scrape struct {
		path string
		ms   int64
	}
	var scrapes []scrape
	for _, f := range files {
		secs, err := strconv.ParseFloat(strings.TrimSuffix(filepath.Base(f), ".prom"), 64)
		if err != nil {
			return fmt.Errorf("%s: file name is not <unix-seconds>.prom", f)
		}
		scrapes = append(scrapes, scrape{f, int64(secs * 1000)})
	}
	sort.Slice(scrapes, func(i, j int) bool { return scrapes[i].ms < scrapes[j].ms })

	stale := math.Float64frombits(value.StaleNaN)
	prev := map[string]labels.Labels{}
	for _, sc := range scrapes {
		b, err := os.ReadFile(sc.path)
		if err != nil {
			return err
		}
		symbols := labels.NewSymbolTable()
		var p textparse.Parser
		if bytes.Contains(b, []byte("# EOF")) { // OpenMetrics (e.g. Rust prometheus-client)
			p = textparse.NewOpenMetricsParser(b, symbols)
		} else {
			p = textparse.NewPromParser(b, symbols, false)
		}
		cur := map[string]labels.Labels{}
		put := func(lset labels.Labels, t int64, v float64) {
			st.add(lset, t, v)
			cur[lset.String()] = lset
		}
		for {
			et, err := p.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return fmt.Errorf("%s: %w", sc.path, err)
			}
			if et != textparse.EntrySeries { // HELP/TYPE/UNIT/comments; native histograms unsupported here
				continue
			}
			_, tp, v := p.Series()
			var lset labels.Labels
			p.Labels(&lset)
			if job != "" { // mimic target labels with honor_labels: false
				lb := labels.NewBuilder(lset)
				for _, n := range []string{"job", "instance"} {
					if old := lb.Get(n); old != "" {
						lb.Set("exported_"+n, old)
					}
				}
				lset = lb.Set("job", job).Set("instance", instance).Labels()
			}
			t := sc.ms
			if tp != nil {
				t = *tp
			}
			put(lset, t, v)
		}
		if job != "" {
			put(labels.FromStrings("__name__", "up", "instance", instance, "job", job), sc.ms, 1)
		}
		for k, l := range prev { // staleness markers, as the scrape loop writes them
			if _, ok := cur[k]; !ok {
				st.add(l, sc.ms, stale)
			}
		}
		prev = cur
	}
	return nil
}

// ---- main

// dirs is a repeatable string flag.
type dirs []string

func (d *dirs) String() string     { return strings.Join(*d, ",") }
func (d *dirs) Set(v string) error { *d = append(*d, v); return nil }

func seriesCount(v parser.Value, wantPoints int) (int, error) {
	switch r := v.(type) {
	case promql.Vector:
		return len(r), nil
	case promql.Scalar: // rules.EngineQueryFunc turns a scalar into a one-sample vector
		return 1, nil
	case promql.Matrix: // range query: count series present at every step
		n := 0
		for _, s := range r {
			if len(s.Floats)+len(s.Histograms) >= wantPoints {
				n++
			}
		}
		return n, nil
	}
	return 0, fmt.Errorf("unexpected result type %s", v.Type())
}

func main() {
	rulesPath := flag.String("rules", "", "rule file (groups: YAML)")
	var scrapeDirs dirs
	flag.Var(&scrapeDirs, "scrapes", "a target's directory of <unix-seconds>.prom files (repeatable)")
	at := flag.Float64("at", 0, "evaluation time, unix seconds")
	honorFor := flag.Bool("honor-for", false, "require the expr to hold at every eval step over the rule's for: duration")
	evalInterval := flag.Duration("eval-interval", time.Minute, "default group interval (global evaluation_interval)")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	p := parser.NewParser(parser.Options{}) // promtool default (no --enable-feature)

	// Same call and output shape as promtool's checkRules (cmd/promtool/main.go).
	fmt.Println("Checking", *rulesPath)
	rgs, errs := rulefmt.ParseFile(*rulesPath, false, model.UTF8Validation, p, logger)
	if errs != nil {
		fmt.Fprintln(os.Stderr, "  FAILED:")
		for _, e := range errs {
			fmt.Fprintln(os.Stderr, e.Error())
		}
		os.Exit(1)
	}

	st := &memStore{byKey: map[string]*memSeries{}}
	for _, dir := range scrapeDirs {
		if err := loadScrapes(dir, "uwsgi-it", filepath.Base(dir), st); err != nil {
			fmt.Fprintln(os.Stderr, "loading scrapes:", err)
			os.Exit(2)
		}
	}
	st.finish()

	eng := promql.NewEngine(promql.EngineOpts{
		Logger:                   logger,
		MaxSamples:               50_000_000,  // 0 would reject every query
		Timeout:                  time.Minute, // 0 would time out immediately
		LookbackDelta:            5 * time.Minute,
		NoStepSubqueryIntervalFn: func(int64) int64 { return evalInterval.Milliseconds() }, // nil panics on `[5m:]`
		EnableAtModifier:         true,
		EnableNegativeOffset:     true,
		Parser:                   p,
	})
	ctx := context.Background()
	ts := time.UnixMilli(int64(*at * 1000))
	failed := false
	for _, g := range rgs.Groups {
		interval := *evalInterval
		if g.Interval != 0 {
			interval = time.Duration(g.Interval)
		}
		evalTS := ts
		if g.QueryOffset != nil {
			evalTS = ts.Add(-time.Duration(*g.QueryOffset))
		}
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue // recording rule (not loaded back into the store here)
			}
			var q promql.Query
			var err error
			want := 0
			if *honorFor && r.For > 0 {
				forDur := time.Duration(r.For)
				want = int(forDur/interval) + 1
				q, err = eng.NewRangeQuery(ctx, st, nil, r.Expr, evalTS.Add(-forDur), evalTS, interval)
			} else {
				q, err = eng.NewInstantQuery(ctx, st, nil, r.Expr, evalTS)
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "ALERT %s error: %v\n", r.Alert, err)
				failed = true
				continue
			}
			res := q.Exec(ctx)
			n, err := 0, res.Err
			if err == nil {
				n, err = seriesCount(res.Value, want)
			}
			q.Close()
			if err != nil {
				fmt.Fprintf(os.Stderr, "ALERT %s error: %v\n", r.Alert, err)
				failed = true
				continue
			}
			state := "quiet"
			if n > 0 {
				state = "fires"
			}
			fmt.Printf("ALERT %s %s\n", r.Alert, state)
		}
	}
	if failed {
		os.Exit(2)
	}
}
