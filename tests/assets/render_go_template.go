// Renders a Go text/template the way Ollama renders a Modelfile TEMPLATE: stdin is JSON
// {"Template": ..., "Messages": [{"Role", "Content"}], "System": ...}; stdout is the prompt.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	Messages []Message
	System   string
}

type Request struct {
	Template string
	Messages []Message
	System   string
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		panic(err)
	}
	t := template.Must(template.New("prompt").Parse(request.Template))
	if err := t.Execute(os.Stdout, Values{Messages: request.Messages, System: request.System}); err != nil {
		panic(err)
	}
}
