// Command gotemplate renders an Ollama Modelfile TEMPLATE with Go's own text/template, the way an
// Ollama server assembles a chat request (standard library only; ATM's tests build it with
// `go build`, no Ollama needed).
//
// stdin: {"modelfile": TEXT, "requests": [[msg...]...]} where a message is {"role": R,
// "content": C}. stdout: {"prompts": [P...]}, one per request.
//
// What it does like Ollama (parser/parser.go, server/routes.go ChatHandler, template/template.go):
//   - read TEMPLATE, SYSTEM and the MESSAGE lines from the Modelfile: values bare to the end of
//     the line, "quoted" or """triple-quoted""" (may span lines); runes that strconv.IsPrint
//     rejects are dropped, except tabs and line breaks inside quotes (Ollama's parser drops them);
//   - parse TEMPLATE with Option("missingkey=zero") and a "json" function;
//   - messages = history + request; SYSTEM goes first unless the request starts with a system
//     message (and only when SYSTEM is not empty);
//   - consecutive messages of one role are merged with "\n\n"; .System joins all system texts;
//   - T must mention .Messages (else Ollama renders it in its legacy .Prompt/.Response mode,
//     which this program refuses rather than imitates);
//   - data: .System .Messages (.Role .Content) .Tools .Response ("") .Think .IsThinkSet.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
	// fields of Ollama's api.Message that a template may test; always empty here
	Thinking  string
	ToolName  string
	Images    []string
	ToolCalls []any
}

type input struct {
	Modelfile string      `json:"modelfile"`
	Requests  [][]message `json:"requests"`
}

type modelfile struct {
	Template, System string
	History          []message
}

// keep drops what Ollama's Modelfile parser drops from a value.
func keep(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strconv.IsPrint(r) || r == '\t' || r == '\n' || r == '\r' {
			b.WriteRune(r)
		}
	}
	return b.String()
}

// fields splits "WORD rest" at the first run of spaces or tabs.
func fields(s string) (string, string) {
	i := strings.IndexAny(s, " \t")
	if i < 0 {
		return s, ""
	}
	return s[:i], strings.TrimLeft(s[i:], " \t")
}

func parseModelfile(text string) (modelfile, error) {
	var mf modelfile
	lines := strings.Split(text, "\n")
	for i := 0; i < len(lines); i++ {
		line := strings.TrimLeft(lines[i], " \t")
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		cmd, rest := fields(line)
		cmd = strings.ToLower(cmd)
		role := ""
		if cmd == "parameter" || cmd == "message" {
			role, rest = fields(rest)
		}
		var value string
		switch {
		case strings.HasPrefix(rest, `"""`):
			body, start := rest[3:], i+1
			for !strings.Contains(body, `"""`) {
				i++
				if i >= len(lines) {
					return mf, fmt.Errorf("line %d: unterminated \"\"\"", start)
				}
				body += "\n" + lines[i]
			}
			end := strings.Index(body, `"""`)
			if strings.TrimSpace(body[end+3:]) != "" {
				return mf, fmt.Errorf("line %d: text after the closing \"\"\"", i+1)
			}
			value = body[:end]
		case len(rest) >= 2 && rest[0] == '"' && strings.HasSuffix(strings.TrimSpace(rest), `"`):
			value = strings.TrimSpace(rest)
			value = value[1 : len(value)-1]
		default:
			value = strings.TrimSpace(rest)
		}
		value = keep(value)
		switch cmd {
		case "template":
			mf.Template = value
		case "system":
			mf.System = value
		case "message":
			if role != "system" && role != "user" && role != "assistant" {
				return mf, fmt.Errorf("line %d: message role must be system, user or assistant", i+1)
			}
			mf.History = append(mf.History, message{Role: role, Content: value})
		case "from", "parameter", "adapter", "license", "requires":
		default:
			return mf, fmt.Errorf("line %d: unknown instruction %q", i+1, cmd)
		}
	}
	return mf, nil
}

// names collects the field and variable identifiers a parse tree mentions.
func names(n parse.Node, out map[string]bool) {
	switch n := n.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, c := range n.Nodes {
				names(c, out)
			}
		}
	case *parse.ActionNode:
		names(n.Pipe, out)
	case *parse.TemplateNode:
		if n.Pipe != nil {
			names(n.Pipe, out)
		}
	case *parse.IfNode:
		names(&n.BranchNode, out)
	case *parse.RangeNode:
		names(&n.BranchNode, out)
	case *parse.WithNode:
		names(&n.BranchNode, out)
	case *parse.BranchNode:
		names(n.Pipe, out)
		names(n.List, out)
		if n.ElseList != nil {
			names(n.ElseList, out)
		}
	case *parse.PipeNode:
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names(a, out)
			}
		}
	case *parse.CommandNode:
		for _, a := range n.Args {
			names(a, out)
		}
	case *parse.FieldNode:
		for _, id := range n.Ident {
			out[strings.ToLower(id)] = true
		}
	case *parse.ChainNode:
		names(n.Node, out)
		for _, id := range n.Field {
			out[strings.ToLower(id)] = true
		}
	case *parse.VariableNode:
		for _, id := range n.Ident {
			out[strings.ToLower(id)] = true
		}
	}
}

// collate merges consecutive messages of one role and joins the system texts.
func collate(msgs []message) (string, []*message) {
	var system []string
	var out []*message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gotemplate: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail("bad input JSON: %v", err)
	}
	mf, err := parseModelfile(in.Modelfile)
	if err != nil {
		fail("Modelfile: %v", err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(mf.Template)
	if err != nil {
		fail("TEMPLATE does not parse: %v", err)
	}
	seen := map[string]bool{}
	for _, t := range tmpl.Templates() {
		if t.Tree != nil {
			names(t.Tree.Root, seen)
		}
	}
	if !seen["messages"] {
		fail("TEMPLATE does not use .Messages: Ollama would render it in legacy .Prompt/.Response mode")
	}
	prompts := []string{}
	for i, req := range in.Requests {
		msgs := append(append([]message{}, mf.History...), req...)
		if len(req) > 0 && req[0].Role != "system" && mf.System != "" {
			msgs = append([]message{{Role: "system", Content: mf.System}}, msgs...)
		}
		system, collated := collate(msgs)
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{
			"System": system, "Messages": collated, "Tools": nil, "Response": "",
			"Think": false, "IsThinkSet": false,
		})
		if err != nil {
			fail("request %d: TEMPLATE does not execute: %v", i, err)
		}
		prompts = append(prompts, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(map[string]any{"prompts": prompts}); err != nil {
		fail("cannot write the output: %v", err)
	}
}
